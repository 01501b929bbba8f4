"""``python -m edgellm``: the same as the ``edgellm`` command."""

from __future__ import annotations

import sys

from edgellm.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
