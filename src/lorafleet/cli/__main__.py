"""`python -m lorafleet.cli ...` (used by torchrun)."""

import sys

from lorafleet.cli import main

sys.exit(main())
