"""`python -m maisi2 ...` runs the `maisi2` command (handy under torchrun: `torchrun -m maisi2 generate ...`)."""

import sys

from maisi2.cli import main

sys.exit(main())
