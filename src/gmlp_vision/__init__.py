"""gmlp-vision: train, evaluate and ship gMLP image classifiers (Liu et al., 2021, "Pay Attention to MLPs").

The public API, the names of ``__all__`` (from the modules named):

- `GMLP` (`gmlp_vision.model`): the network.
- `Classifier` (`gmlp_vision.predict`): classify images with a checkpoint, a run directory or an export.
- `Config`, `ModelConfig`, `from_preset` (`gmlp_vision.config`): a run's configuration; `PRESETS`
  (`gmlp_vision.presets`).
- `load_checkpoint`, `load_model` (`gmlp_vision.checkpoint`).
- `Callback` (`gmlp_vision.callbacks`): hooks into a training run (``from gmlp_vision.train import train``: the
  package's attribute ``train`` is that module); `default_callbacks` (`gmlp_vision.reporting`): the plots (and
  TensorBoard) that ``gmlp train`` writes.
- ``__version__`` (`gmlp_vision.version`).

This is the one place that re-exports names; every other module's ``__all__`` lists only what it defines
(`tests/test_public_api.py`), and the packages `config`, `data` and `cli` re-export their own modules' names. The
names load their modules (and torch) on first use, so ``import gmlp_vision`` and ``gmlp --help`` stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gmlp_vision.version import __version__

_WHERE = {
    "GMLP": "gmlp_vision.model",
    "Classifier": "gmlp_vision.predict",
    "PRESETS": "gmlp_vision.presets",
    "Config": "gmlp_vision.config",
    "ModelConfig": "gmlp_vision.config",
    "from_preset": "gmlp_vision.config",
    "load_checkpoint": "gmlp_vision.checkpoint",
    "load_model": "gmlp_vision.checkpoint",
    "Callback": "gmlp_vision.callbacks",
    "default_callbacks": "gmlp_vision.reporting",
}
__all__ = [
    "GMLP",
    "PRESETS",
    "Callback",
    "Classifier",
    "Config",
    "ModelConfig",
    "__version__",
    "default_callbacks",
    "from_preset",
    "load_checkpoint",
    "load_model",
]

if TYPE_CHECKING:
    from gmlp_vision.callbacks import Callback
    from gmlp_vision.checkpoint import load_checkpoint, load_model
    from gmlp_vision.config import Config, ModelConfig, from_preset
    from gmlp_vision.model import GMLP
    from gmlp_vision.predict import Classifier
    from gmlp_vision.presets import PRESETS
    from gmlp_vision.reporting import default_callbacks


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gmlp_vision' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
