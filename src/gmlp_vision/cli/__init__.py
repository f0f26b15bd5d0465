"""The ``gmlp`` command.

`main.py` holds the shell and train, evaluate, presets and info; `tools.py` predict, export and report; `flags.py` the
training flags generated from the config's fields.
"""

from gmlp_vision.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
