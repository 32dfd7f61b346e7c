"""Op benchmarks over seqlens (selective scan, causal conv1d, SDPA attention): the program behind
``ssmkit bench`` (:mod:`ssmkit.bench.ops`), runnable from a checkout.

    python benchmarks/ops.py --device cuda --dtype bf16 --out-dir docs/benchmarks
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ssmkit

from ssmkit.bench.ops import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
