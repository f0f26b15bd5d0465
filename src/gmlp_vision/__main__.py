"""``python -m gmlp_vision`` runs the command-line interface."""

import sys

from gmlp_vision.cli.main import main

sys.exit(main())
