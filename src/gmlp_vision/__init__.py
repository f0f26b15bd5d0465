"""gmlp-vision: train, evaluate and ship gMLP image classifiers (Liu et al., 2021, "Pay Attention to MLPs")."""

from gmlp_vision.checkpoint import load_checkpoint, load_model
from gmlp_vision.config import PRESETS, Config, ModelConfig, from_preset
from gmlp_vision.model import GMLP
from gmlp_vision.predict import Classifier

__version__ = "0.2.0"
__all__ = [
    "GMLP",
    "Classifier",
    "PRESETS",
    "Config",
    "ModelConfig",
    "from_preset",
    "load_checkpoint",
    "load_model",
    "__version__",
]
