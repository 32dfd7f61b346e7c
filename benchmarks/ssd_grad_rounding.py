"""How much one bfloat16 rounding of the output gradient moves SSD's gradients, in float64.

The GPU test compares the Triton SSD backward on bfloat16 inputs to a float64 reference (relative
RMS error <= 5e-3). This program computes, with the float64 chunked form on the CPU (exact up to
float64), the relative RMS change of every gradient when

* ``test gy``: the output gradient is rounded to bfloat16 (what the kernel receives) instead of
  given in float32 (what the reference used to receive);
* ``gated dy``: the gradient after the ``silu(z)`` gate is rounded to bfloat16 (what the
  backward kernel's matmuls take as operands).

The shape is the GPU test's ``(batch 2, seqlen 333, H 4, P 48, G 1, N 40)``, inputs drawn as
there, one line per seed. dt_bias's gradient is 4 sums over 666 positions whose terms cancel,
so it moves the most.

    python benchmarks/ssd_grad_rounding.py [--seeds 8] [--out-dir docs/benchmarks]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._results import cpu_name, result_path, write_json  # noqa: E402
from ssmkit.ops.ssd import ssd  # noqa: E402
from ssmkit.testing import rel_err  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")
SHAPE = (2, 333, 4, 48, 1, 40)


def _grads(ts, dy, dh):
    x, dt, A, B, C, D, bias, h0 = ts
    y, hT = ssd(x, dt, A, B, C, D, None, bias, dt_softplus=True, initial_state=h0, return_final_state=True,
                backend="chunked")
    return torch.autograd.grad([y, hT], ts, [dy, dh])


def run(seed: int) -> dict:
    b, L, H, P, G, N = SHAPE
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(torch.bfloat16)

    x, z = r(b, L, H, P), r(b, L, H, P)
    dt = r(b, L, H, scale=0.5) - 1.0
    A = -(torch.rand(H, generator=g) * 4 + 0.5)
    B, C = r(b, L, G, N), r(b, L, G, N)
    D, bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.3
    h0 = torch.randn(b, H, P, N, generator=g)
    gy, gh = torch.randn(b, L, H, P, generator=g).double(), torch.randn(b, H, P, N, generator=g).double()
    ts = [t.detach().double().requires_grad_() for t in (x, dt, A, B, C, D, bias, h0)]
    gate = F.silu(z.double())  # y * silu(z): the gradient reaching the SSM is gy * silu(z)
    gy16 = gy.to(torch.bfloat16).double()
    exact = _grads(ts, gy * gate, gh)
    test_gy = _grads(ts, gy16 * gate, gh)
    exact16 = _grads(ts, gy16 * gate, gh)
    gated = _grads(ts, (gy16 * gate).to(torch.bfloat16).double(), gh)
    return {"seed": seed,
            "test gy": {n: rel_err(w, a) for n, a, w in zip(NAMES, test_gy, exact)},
            "gated dy": {n: rel_err(w, a) for n, a, w in zip(NAMES, gated, exact16)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out-dir", default=None, help="write OUT_DIR/ssd_grad_rounding_cpu_<date>.json")
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, shape {SHAPE}, float64")
    rows = []
    for seed in range(args.seeds):
        row = run(seed)
        rows.append(row)
        for what in ("test gy", "gated dy"):
            print(f"seed {seed} {what:9s}", " ".join(f"{n}={v:.1e}" for n, v in row[what].items()))
    if args.out_dir:
        path = result_path(args.out_dir, "ssd_grad_rounding", device="cpu")
        write_json(path, {"cpu": cpu_name(), "torch": torch.__version__, "shape": SHAPE, "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
