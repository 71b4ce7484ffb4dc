"""``python -m seqattn``: the ``seqattn`` command line (``demo``, ``--version``)."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module (tools, doctest collection) runs nothing
    sys.exit(main())
