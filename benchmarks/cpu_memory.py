"""CPU prefill with glibc's malloc keeping freed memory (``ssmkit.ops.cpu_memory``, the default) and
without (``SSMKIT_CPU_KEEP_MEMORY=0``): time and page faults per 1024-token prefill of the 130M
Mamba, Mamba-2 and Gated DeltaNet models, eager, 1 and 2 threads. Each measurement runs in a
process of its own (the setting is per process), the two settings alternating, ``--rounds`` times.

    python benchmarks/cpu_memory.py --out results/cpu_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import cpu_name, write_json  # noqa: E402

_CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {here!r})
from cpu_floor import build
torch.set_num_threads({threads})
model = build({model!r})
ids = torch.randint(0, 50000, (1, {seqlen}))
ts, faults = [], []
with torch.inference_mode():
    model(ids, logits_to_keep=1)
    for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        ts.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print("RESULT " + json.dumps({{"ms": 1e3 * sorted(ts)[1], "faults": sorted(faults)[1]}}))
"""


def child(model: str, threads: int, seqlen: int, keep: bool) -> dict:
    code = _CHILD.format(here=os.path.dirname(os.path.abspath(__file__)), threads=threads, model=model,
                         seqlen=seqlen)
    env = dict(os.environ, SSMKIT_CPU_KEEP_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mamba", "mamba2", "gated-deltanet"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path")
    a = p.parse_args(argv)
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "command": "python benchmarks/cpu_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(info, flush=True)
    rows = []
    for model in a.models:
        for threads in a.threads:
            runs = {False: [], True: []}
            for _ in range(a.rounds):
                for keep in (False, True):
                    runs[keep].append(child(model, threads, a.seqlen, keep))
            row = {"model": model, "threads": threads}
            for keep, name in ((False, "default_malloc"), (True, "kept")):
                row[f"{name}_ms"] = round(statistics.median(r["ms"] for r in runs[keep]), 1)
                row[f"{name}_faults"] = int(statistics.median(r["faults"] for r in runs[keep]))
            row["speedup"] = round(row["default_malloc_ms"] / row["kept_ms"], 3)
            print(f"{model:15s} {threads} thr  malloc defaults {row['default_malloc_ms']:7.0f} ms "
                  f"({row['default_malloc_faults']:6d} faults)  kept {row['kept_ms']:7.0f} ms "
                  f"({row['kept_faults']:6d} faults)  {row['speedup']:.2f}x", flush=True)
            rows.append(row)
    if a.out:
        write_json(a.out, {"info": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
