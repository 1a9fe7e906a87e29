"""Token-reduction trade-off sweeps: accuracy, analytic and XLA FLOPs, throughput, tokens per layer.

    python eval.py                                    # default: DINOv2-small + Fashion-MNIST linear probe
    python eval.py --config eval_quick                # tiny smoke sweep
    python eval.py --config eval_dinov2_fmnist num_test=500 methods="('tome','pitome')"

Every method is compared at equal analytic FLOPs: for each target fraction of the unreduced FLOPs the
budget solver (``evaluation.budget``) picks the method's setting closest from below. Results go to
``results/eval/<config_name>/`` (``points.json``, ``points.csv``, ``table.md``, PNG plots, the resolved
``config.json``).
"""

from __future__ import annotations

import sys

from evaluation.cli import main, parse_args, run  # noqa: F401  (the command line lives in evaluation.cli)

if __name__ == "__main__":
    sys.exit(main())
