"""``python eval.py``: the evaluation command line (``evaluation.cli``; also installed as ``tokenreduce-eval``).

    python eval.py                                    # default: DINOv2-small + Fashion-MNIST linear probe
    python eval.py --help                             # presets, override syntax, every method and option
"""

from __future__ import annotations

import sys

from evaluation.cli import main, parse_args, run  # noqa: F401  (the command line lives in evaluation.cli)

if __name__ == "__main__":
    sys.exit(main())
