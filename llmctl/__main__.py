"""`python -m llmctl` (and `torchrun -m llmctl`) run the CLI."""

import sys

from llmctl.cli import main

if __name__ == "__main__":
    sys.exit(main())
