"""Same as the console script (python scripts/pretrain.py --help)."""
import sys

from ssl_kit.cli import pretrain_main

sys.exit(pretrain_main())
