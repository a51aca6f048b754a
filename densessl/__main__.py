"""``python -m densessl`` = the ``densessl`` command (used by torchrun / srun launchers)."""

import sys

from densessl.cli import main

sys.exit(main())
