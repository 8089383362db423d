"""``python -m ptqlab`` (and ``torchrun -m ptqlab``): the command line."""

import sys

from .cli import main

sys.exit(main())
