"""Same as the console script (python scripts/knn.py --help)."""
import sys

from ssl_kit.eval.cli import knn_main

sys.exit(knn_main())
