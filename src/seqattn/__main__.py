"""``python -m seqattn demo``."""

import sys

from .cli import main

sys.exit(main())
