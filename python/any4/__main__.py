"""``python -m any4 ...``: the command line (also what ``torchrun -m any4 quantize`` runs)."""

import sys

from .cli import main

sys.exit(main())
