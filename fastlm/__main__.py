"""``python -m fastlm``: the same as the ``fastlm`` command."""

import sys

from fastlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
