"""Same as the console script (python scripts/export.py --help)."""
import sys

from ssl_kit.eval.cli import export_main

sys.exit(export_main())
