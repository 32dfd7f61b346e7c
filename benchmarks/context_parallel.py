"""Context parallelism: the longest trainable sequence and training tokens/s against the number of
ranks a sequence is sharded over.

For each rank count R in ``--ranks``, a language model (``--preset``; default ``tiny-mamba2`` on
the CPU, ``mamba2-130m`` on CUDA) trains on one sequence sharded over R ranks (AdamW, the loss
without logits, bf16 autocast on CUDA): the sequence length doubles from ``--start-seqlen``, each
length timed over ``--steps`` steps after one warm-up step (median), until the next doubling's peak
memory per rank, extrapolated linearly from the last two lengths, would pass ``--memory-gib`` (or
``--max-seqlen`` is reached). The report gives tokens/s and peak memory per length, the longest
length measured and the longest predicted to fit. Peak memory: ``torch.cuda.max_memory_allocated``
on CUDA; the process's peak resident set on the CPU (it never shrinks, so it is an upper bound).

``--compare-checkpointing`` also times one rank at ``--start-seqlen`` without and with activation
checkpointing (peak memory on CUDA).

``--op-costs`` instead times each op's context-parallel form (2 ranks, exchange included)
against the plain op on the same shard of ``--start-seqlen`` positions.

``--group-of-one`` also times the context-parallel path with a group of one rank against the plain
path (interleaved steps, medians) at ``--start-seqlen``.

CPU, gloo (spawns max(--ranks) processes)::

    python benchmarks/context_parallel.py --ranks 1 2 4 --out-dir results/

GPUs, NCCL (one process per GPU; R ranks run on GPUs 0..R-1, the others wait)::

    torchrun --nproc_per_node=8 benchmarks/context_parallel.py --ranks 1 2 4 8 \\
        --preset mamba2-130m --activation-checkpointing --out-dir results/

One GPU: a group of one rank against the plain path, and activation checkpointing at 65,536::

    torchrun --nproc_per_node=1 benchmarks/context_parallel.py --ranks 1 --preset mamba2-130m \\
        --start-seqlen 65536 --max-seqlen 65536 --group-of-one --compare-checkpointing --out-dir results/
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _results import (  # noqa: E402
    cpu_name,  # noqa: E402
    result_path,
    write_json,
)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _build(args, device, group, checkpointing):
    from ssmkit.models.config import ModelConfig
    from ssmkit.models.lm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.from_name(args.preset)).to(device).train()
    model.set_context_parallel(group)
    model.set_activation_checkpointing(checkpointing)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _step_fn(model, opt, ids, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def _timed(step, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def sweep(args, device, group, rank, R) -> list[dict]:
    """Rows ``{seqlen, step_ms, tokens_per_s, peak_gib}`` for one sequence over R ranks."""
    from ssmkit.ops import context_parallel as cp

    model, opt = _build(args, device, group, args.activation_checkpointing)
    vocab = model.config.vocab_size
    rows, L = [], args.start_seqlen
    while L <= args.max_seqlen:
        ids = torch.randint(0, vocab, (1, L), generator=torch.Generator().manual_seed(L))
        ids = cp.shard(ids, rank, R).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = _step_fn(model, opt, ids, device)
        step()  # warm-up
        t = statistics.median(_timed(step, args.steps))
        peak = float(cp.all_reduce_sum(torch.tensor([_peak_gib(device)], device=device), group=group)[0]) / R
        rows.append({"seqlen": L, "step_ms": t * 1e3, "tokens_per_s": L / t, "peak_gib_per_rank": peak})
        if len(rows) >= 2:
            (l0, p0), (l1, p1) = [(r["seqlen"], r["peak_gib_per_rank"]) for r in rows[-2:]]
            slope = max((p1 - p0) / (l1 - l0), 1e-12)
            if p1 + slope * L > args.memory_gib:  # the next doubling would not fit
                break
        L *= 2
    return rows


def _predicted_max(rows, budget):
    if len(rows) < 2:
        return None
    (l0, p0), (l1, p1) = [(r["seqlen"], r["peak_gib_per_rank"]) for r in rows[-2:]]
    slope = (p1 - p0) / (l1 - l0)
    return int(l1 + (budget - p1) / slope) if slope > 0 else None


def group_of_one(args, device, rank) -> dict:
    """Plain path vs the context-parallel path with a one-rank group, steps interleaved."""
    single = dist.new_group([rank]) if dist.is_initialized() else None  # (every rank calls new_group)
    out = {}
    if single is None:
        return out
    ckpt = args.activation_checkpointing
    models = {"plain": _build(args, device, None, ckpt), "group_of_one": _build(args, device, single, ckpt)}
    ids = torch.randint(0, models["plain"][0].config.vocab_size, (1, args.start_seqlen)).to(device)
    steps = {k: _step_fn(m, o, ids, device) for k, (m, o) in models.items()}
    for s in steps.values():
        s()
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for k, s in steps.items():
            times[k] += _timed(s, 1)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out = {"seqlen": args.start_seqlen, "activation_checkpointing": ckpt, "step_ms": med,
           "overhead": med["group_of_one"] / med["plain"] - 1}
    print(f"group of one at {args.start_seqlen:,}: {med['plain']:.1f} -> {med['group_of_one']:.1f} ms "
          f"({100 * out['overhead']:+.2f}%)", flush=True)
    return out


def compare_checkpointing(args, device) -> dict:
    """One rank, ``--start-seqlen`` positions: step time and peak memory without and with
    activation checkpointing (peak memory on CUDA only: a process's peak resident set never
    falls, so the CPU cannot tell the second run's peak from the first's)."""
    out = {"seqlen": args.start_seqlen}
    ids = torch.randint(0, 1 << 30, (1, args.start_seqlen), generator=torch.Generator().manual_seed(0))
    for name, on in (("plain", False), ("activation_checkpointing", True)):
        model, opt = _build(args, device, None, on)
        step = _step_fn(model, opt, (ids % model.config.vocab_size).to(device), device)
        try:
            step()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = statistics.median(_timed(step, args.steps))
            out[name] = {"step_ms": t * 1e3, "tokens_per_s": args.start_seqlen / t,
                         "peak_gib": _peak_gib(device) if device.type == "cuda" else None}
        except torch.cuda.OutOfMemoryError:  # stated in the report, not hidden
            out[name] = {"step_ms": None, "tokens_per_s": None, "peak_gib": "out of memory"}
        del model, opt, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"activation checkpointing at {args.start_seqlen:,}: step {out['plain']['step_ms']} -> "
          f"{out['activation_checkpointing']['step_ms']} ms; peak {out['plain']['peak_gib']} -> "
          f"{out['activation_checkpointing']['peak_gib']} GiB", flush=True)
    return out


def _op_cases(L, device):
    """``name -> (plain(), context_parallel(group))`` on one rank's shard of length ``L``: each a
    forward and backward of the op."""
    from ssmkit import ops
    from ssmkit.ops import context_parallel as cp

    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    def fb(fn):
        def run():
            out = fn()
            out.float().square().sum().backward()
        return run

    d, N = 256, 16
    sx, sdt, sB, sC = r(1, L, d), r(1, L, d, scale=0.5), r(1, L, 1, N), r(1, L, 1, N)
    sA = (-torch.rand(d, N, generator=g) - 0.5).to(device)
    H, P, Ns = 8, 64, 64
    x, dt, B, C = r(1, L, H, P), r(1, L, H, scale=0.5), r(1, L, 1, Ns), r(1, L, 1, Ns)
    A = (-torch.rand(H, generator=g) - 0.5).to(device)
    Hd, K, V = 4, 64, 128
    q, k, v = r(1, L, Hd, K), r(1, L, Hd, K), r(1, L, Hd, V)
    beta = torch.rand(1, L, Hd, generator=g).to(device).requires_grad_()
    lg = (-torch.rand(1, L, Hd, generator=g) * 0.1).to(device).requires_grad_()
    cx, cw = r(1, L, 1024), r(1024, 4)
    return {
        f"selective_scan (d={d}, N={N})": (
            fb(lambda: ops.selective_scan(sx, sdt, sA, sB, sC, dt_softplus=True)),
            lambda grp: fb(lambda: cp.selective_scan(sx, sdt, sA, sB, sC, group=grp, dt_softplus=True))),
        f"ssd (H={H}, P={P}, N={Ns})": (
            fb(lambda: ops.ssd(x, dt, A, B, C, dt_softplus=True)),
            lambda grp: fb(lambda: cp.ssd(x, dt, A, B, C, group=grp, dt_softplus=True))),
        f"gated delta rule (H={Hd}, K={K}, V={V})": (
            fb(lambda: ops.delta_rule(q, k, v, beta=beta, g=lg, use_qk_l2norm=True)),
            lambda grp: fb(lambda: cp.delta_rule(q, k, v, beta=beta, g=lg, group=grp, use_qk_l2norm=True))),
        "causal_conv1d (dim=1024, width=4)": (
            fb(lambda: ops.causal_conv1d(cx, cw, activation="silu")),
            lambda grp: fb(lambda: cp.causal_conv1d(cx, cw, activation="silu", group=grp))),
    }


def op_costs(args, device, rank, world) -> dict:
    """Forward + backward of each op on one rank's shard: the context-parallel form (2 ranks,
    its exchange included) against the plain op on the same shard, interleaved, medians."""
    group = dist.new_group(list(range(2)))
    out = {}
    if rank < 2:
        for name, (plain, make) in _op_cases(args.start_seqlen, device).items():
            runs = {"plain": plain, "context_parallel": make(group)}
            for fn in runs.values():
                fn()
            times = {k: [] for k in runs}
            for _ in range(args.steps):
                for k, fn in runs.items():
                    times[k] += _timed(fn, 1)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            out[name] = {"ms": med, "ratio": med["context_parallel"] / med["plain"]}
            if rank == 1:
                print(f"{name}: plain {med['plain']:.1f} ms, context-parallel {med['context_parallel']:.1f} ms "
                      f"(x{out[name]['ratio']:.2f}) per rank, shard of {args.start_seqlen}", flush=True)
    # rank 1's numbers: the rank that receives a state and corrects its outputs
    shared = [None] * world
    dist.all_gather_object(shared, out)
    return shared[1]


def measure(rank: int, world: int, args) -> dict:
    """Every process runs this; rank 0's return value is the report."""
    if torch.cuda.is_available() and not args.cpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    budget = args.memory_gib
    if budget is None:
        budget = 0.9 * torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 2.0
    args.memory_gib = budget
    if args.op_costs:
        return {"machine": machine(device), "device": device.type, "date": datetime.date.today().isoformat(),
                "torch": str(torch.__version__), "shard": args.start_seqlen, "op_costs": op_costs(args, device, rank, world)}
    report = {"machine": machine(device), "device": device.type, "date": datetime.date.today().isoformat(),
              "torch": str(torch.__version__), "threads_per_rank": torch.get_num_threads(), "preset": args.preset, "memory_gib_per_rank": budget,
              "activation_checkpointing": args.activation_checkpointing, "ranks": {}}
    for R in args.ranks:
        group = dist.new_group(list(range(R))) if world > 1 else None  # every rank calls new_group
        if rank < R:
            rows = sweep(args, device, group, rank, R)
            report["ranks"][R] = {"rows": rows, "max_seqlen_measured": rows[-1]["seqlen"],
                                  "max_seqlen_predicted": _predicted_max(rows, budget)}
            if rank == 0:
                r = report["ranks"][R]
                print(f"{R} rank(s): up to {r['max_seqlen_measured']:,} tokens measured "
                      f"({rows[-1]['tokens_per_s']:,.0f} tokens/s, {rows[-1]['peak_gib_per_rank']:.2f} GiB per rank)"
                      f"; {r['max_seqlen_predicted'] or 0:,} predicted to fit", flush=True)
        if world > 1:
            dist.barrier()
    if args.group_of_one:
        report["group_of_one"] = group_of_one(args, device, rank)
    if args.compare_checkpointing and rank == 0:
        report["checkpointing"] = compare_checkpointing(args, device)
    return report


def _spawned(rank, world, args):  # (ssmkit.testing.run_on_ranks: a gloo group on the CPU)
    return measure(rank, world, args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts to measure")
    p.add_argument("--preset", default=None, help="model preset (default: tiny-mamba2 on CPU, mamba2-130m on CUDA)")
    p.add_argument("--start-seqlen", type=int, default=512)
    p.add_argument("--max-seqlen", type=int, default=2**24)
    p.add_argument("--memory-gib", type=float, default=None,
                   help="peak memory per rank allowed (default: 90%% of the GPU; 2 GiB on the CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per length (median)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--group-of-one", action="store_true", help="also time a one-rank group against the plain path")
    p.add_argument("--compare-checkpointing", action="store_true",
                   help="also time one rank at --start-seqlen without and with activation checkpointing")
    p.add_argument("--op-costs", action="store_true",
                   help="instead: each op's context-parallel form on a shard of --start-seqlen (2 ranks) "
                        "against the plain op on the same shard")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with CUDA present")
    p.add_argument("--out-dir", default="results")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    args.preset = args.preset or ("mamba2-130m" if cuda else "tiny-mamba2")
    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
        rank, world = dist.get_rank(), dist.get_world_size()
        if max(args.ranks) > world:
            p.error(f"--ranks {max(args.ranks)} > {world} processes")
        report = measure(rank, world, args)
        dist.barrier()
        dist.destroy_process_group()
    elif max(args.ranks) > 1 or args.op_costs:
        if cuda:
            p.error("on CUDA, launch with torchrun --nproc_per_node=N (one process per GPU)")
        from ssmkit.testing import run_on_ranks

        world = 2 if args.op_costs else max(args.ranks)
        rank, report = 0, run_on_ranks(_spawned, world, args, timeout_s=600)[0]
    else:
        rank, report = 0, measure(0, 1, args)
    if rank == 0:
        name = "context_parallel_ops" if args.op_costs else "context_parallel"
        path = result_path(args.out_dir, name, "cuda" if cuda else "cpu")
        write_json(path, report)
        print(f"{report['machine']}: results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
