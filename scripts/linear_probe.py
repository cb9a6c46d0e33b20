"""Same as the console script (python scripts/linear_probe.py --help)."""
import sys

from ssl_kit.eval.cli import linear_probe_main

sys.exit(linear_probe_main())
