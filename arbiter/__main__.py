"""``python -m arbiter``: the same command line as the ``arbiter`` script (see :mod:`arbiter.cli`).

Also the entry point ``torchrun ... -m arbiter diagnose`` uses for data-parallel diagnoses."""

import sys

from .cli import main

sys.exit(main())
