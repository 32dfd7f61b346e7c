"""Op benchmarks over seqlens (selective scan, causal conv1d, SDPA attention): the program behind
``ssmkit bench`` (:mod:`ssmkit.bench.ops`), runnable from a checkout.

    python benchmarks/ops.py --device cuda --dtype bf16 --out-dir docs/benchmarks
"""

import sys

from ssmkit.bench.ops import main

if __name__ == "__main__":
    sys.exit(main())
