"""Same as the console script (python scripts/finetune.py --help)."""
import sys

from ssl_kit.eval.cli import finetune_main

sys.exit(finetune_main())
