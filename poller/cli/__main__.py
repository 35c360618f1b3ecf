"""`python -m poller.cli`: the batch-poller command."""

import sys

from poller.cli import main

sys.exit(main())
