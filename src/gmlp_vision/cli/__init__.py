"""The ``gmlp`` command.

`main.py` holds the shell and train, presets and info; `model_commands.py` the commands that take a trained model
(evaluate, predict, export, report); `flags.py` the training flags generated from the config's fields.

The package's API is ``__all__``: `main.main` (the ``gmlp`` console script, ``gmlp_vision.cli:main``) and
`main.build_parser`, imported from here; like `gmlp_vision/__init__.py`, this file re-exports on purpose.
"""

from gmlp_vision.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
