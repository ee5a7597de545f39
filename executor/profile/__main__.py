"""`python -m executor.profile --out FILE --nproc N` (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
