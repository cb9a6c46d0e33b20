"""Same as the console script (python scripts/qscore.py --help)."""
import sys

from ssl_kit.eval.qscore_cli import qscore_main

sys.exit(qscore_main())
