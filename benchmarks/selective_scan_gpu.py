"""Selective scan on the GPU: ssmkit's Triton kernels vs ``mamba_ssm.selective_scan_fn``, same run.

B8 D2048 N16 bf16 with z, D, dt_bias and softplus, L in {2048, 8192}: forward and
forward+backward medians from ``triton.testing.do_bench`` (with the saved states bounded in memory
and not), optionally a sweep of launch configurations and the batch-1 prefill shapes, the floors
(exponentials and bytes) and the ratios. Writes JSON (``--out-dir``).

    python benchmarks/selective_scan_gpu.py --prefill --out-dir docs/benchmarks

Peer: ``pip install mamba-ssm --no-build-isolation`` (builds its CUDA extension against the
installed torch, a few minutes; needs nvcc). Without it ``--no-peer`` times ssmkit alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _light_import  # noqa: E402
from _results import result_path, write_json  # noqa: E402

_light_import.light()

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench as _do_bench  # noqa: E402


def do_bench(fn, warmup=25, rep=200, **kw):
    """``triton.testing.do_bench`` after one untimed call (a first call compiles: the GPU idles
    meanwhile and lowers its clocks) and with at least 250 ms of warm-up to bring them back."""
    fn()
    torch.cuda.synchronize()
    return _do_bench(fn, warmup=max(warmup, 250), rep=rep, **kw)

from ssmkit.ops.selective_scan import triton as sst  # noqa: E402

EXP_RATE = 4.0e12  # exponentials / s (MUFU ex2 on an H100 SXM at boost clock)
BW = 3.0e12  # bytes / s achievable HBM3 bandwidth


def make(bsz, L, dim, N, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(bsz, L, dim, device="cuda", dtype=dtype, generator=g)
    dt = (torch.randn(bsz, L, dim, device="cuda", generator=g) * 0.5 - 2.0).to(dtype)
    z = torch.randn(bsz, L, dim, device="cuda", dtype=dtype, generator=g)
    A = -torch.arange(1, N + 1, device="cuda", dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(bsz, L, N, device="cuda", dtype=dtype, generator=g)
    C = torch.randn(bsz, L, N, device="cuda", dtype=dtype, generator=g)
    D = torch.ones(dim, device="cuda")
    bias = torch.rand(dim, device="cuda") * 0.1
    return x, dt, A, B, C, D, z, bias


def floors(bsz, L, dim, N, esize=2):
    n_exp = bsz * L * dim * N
    io = bsz * L * (4 * dim + 2 * N) * esize  # x, dt, z, y + B, C
    f = max(n_exp / EXP_RATE, io / BW) * 1e3
    # fwd+bwd: exps twice (forward, recompute) + reads x, dt, z, B, C, dy, writes dx, ddt, dz, dB, dC
    io_b = io + bsz * L * (7 * dim + 4 * N) * esize
    fb = max(2 * n_exp / EXP_RATE, io_b / BW) * 1e3
    return {"exp_ms": n_exp / EXP_RATE * 1e3, "bytes_ms": io / BW * 1e3, "fwd_floor_ms": f,
            "fwd_bwd_floor_ms": fb}


def bench_ours(ts, cfg=None, bwd=True):
    if cfg is not None:
        sst.set_config(cfg)
    x, dt, A, B, C, D, z, bias = ts
    fwd = do_bench(lambda: sst.selective_scan_triton(x, dt, A, B, C, D, z, bias, True),
                   warmup=25, rep=200, return_mode="median")
    res = {"fwd_ms": fwd}
    # agreement with the tile kernel in float32 (a different code path): relative RMS error
    y = sst.selective_scan_triton(x, dt, A, B, C, D, z, bias, True).float()
    prev = sst.set_config(dataclasses.replace(sst.get_config(), seq_split=1, fwd_quad=0))
    yt = sst.selective_scan_triton(x.float(), dt.float(), A, B.float(), C.float(), D, z.float(),
                                   bias, True)
    sst.set_config(prev)
    res["rel_rms_vs_tile_fp32"] = float((y - yt).norm() / yt.norm())
    if bwd:
        leaves = [t.detach().requires_grad_() for t in ts]
        gy = torch.randn_like(x)

        def step():
            y = sst.selective_scan_triton(*leaves, True)
            y.backward(gy)

        res["fwd_bwd_ms"] = do_bench(step, warmup=25, rep=200, grad_to_none=leaves,
                                     return_mode="median")
    return res


def bench_mamba(ts, bwd=True):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    x, dt, A, B, C, D, z, bias = ts
    # mamba_ssm's layout: (batch, dim, seqlen) and (batch, N, seqlen), made contiguous up front.
    u, delta, zz = (t.transpose(1, 2).contiguous() for t in (x, dt, z))
    Bm, Cm = (t.transpose(1, 2).contiguous() for t in (B, C))
    fwd = do_bench(lambda: selective_scan_fn(u, delta, A, Bm, Cm, D, zz, bias, True),
                   warmup=25, rep=200, return_mode="median")
    res = {"fwd_ms": fwd}
    if bwd:
        leaves = [t.detach().requires_grad_() for t in (u, delta, A, Bm, Cm, D, zz, bias)]
        gy = torch.randn_like(u)

        def step():
            y = selective_scan_fn(*leaves, True)
            y.backward(gy)

        res["fwd_bwd_ms"] = do_bench(step, warmup=25, rep=200, grad_to_none=leaves,
                                     return_mode="median")
    return res


# Forward configurations swept (overrides of ScanConfig): the default and the tile forward.
# Each compiles a large unrolled kernel (10-30 s): keep the lists short.
FWD_SWEEP = [{}, dict(fwd_quad=0)]
# the forward with a gradient to come (saves states) and the backward, compiled once each
GRAD_WARM = [{}, dict(bwd_quad=0), dict(bwd_quad_warps=8)]
# Backward configurations (overrides of the best forward's ScanConfig): the default, 8 warps per
# program, and the tile backward.
BWD_SWEEP = [{}, dict(bwd_quad_warps=8), dict(bwd_quad=0)]
# --split-sweep: sequence segments for forward + backward (1 = one pass)
SPLIT_SWEEP = [1, 2, 3, 4, 6, 8]


def _warm_one(job) -> str:
    """Run one configuration once (no-grad forward; forward + backward if ``grad``) so that
    Triton compiles it into its on-disk cache; executed in a worker process."""
    cfg_fields, shape, grad = job
    try:
        sst.set_config(sst.ScanConfig(**cfg_fields))
        ts = make(*shape)
        sst.selective_scan_triton(*ts, True)
        if grad:
            leaves = [t.detach().requires_grad_() for t in ts]
            sst.selective_scan_triton(*leaves, True).float().sum().backward()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001
        return repr(e)


def warm_compile(cfgs: list[tuple[dict, bool]], shapes: list[tuple], workers: int = 8) -> None:
    """Compile every (configuration, shape) in parallel processes before timing anything: the
    kernels are large unrolled programs (10-30 s each to compile), and a sweep that compiles them
    one after the other spends most of its time compiling. Later compiles in this process
    find them in Triton's cache."""
    import concurrent.futures
    import multiprocessing

    jobs = [(c, sh, grad) for c, grad in cfgs for sh in shapes]
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                                mp_context=ctx) as ex:
        res = list(ex.map(_warm_one, jobs))
    bad = [(j, r) for j, r in zip(jobs, res) if r != "ok"]
    print(f"compiled {len(jobs)} configurations in {time.time() - t0:.0f} s"
          + (f"; failed: {bad}" if bad else ""), flush=True)


def make_strided(bsz, L, dim, N, dtype=torch.bfloat16, seed=0, dt_rank=128):
    """As :func:`make`, with z, B and C laid out as in the Mamba layer: z a slice of the
    ``(bsz, L, 2*dim)`` in_proj output, B and C slices of the ``(bsz, L, dt_rank + 2N)`` x_proj
    output (the forward reads them through their row strides)."""
    x, dt, A, B, C, D, z, bias = make(bsz, L, dim, N, dtype, seed)
    xz = torch.empty(bsz, L, 2 * dim, device="cuda", dtype=dtype)
    xz[..., dim:] = z
    dbl = torch.empty(bsz, L, dt_rank + 2 * N, device="cuda", dtype=dtype)
    dbl[..., dt_rank:dt_rank + N] = B
    dbl[..., dt_rank + N:] = C
    return (x, dt, A, dbl[..., dt_rank:dt_rank + N], dbl[..., dt_rank + N:], D, xz[..., dim:],
            bias)


# batch-1 prefill variants (ScanConfig overrides)
PREFILL_VARIANTS = {"auto": {}, "auto, (block_d, N) tile": dict(fwd_quad=0),
                    "one pass": dict(seq_split=1), "8 segments": dict(seq_split=8)}


def bench_prefill(no_peer: bool) -> list[dict]:
    """Batch-1 prefill shapes (Mamba-1.4B: d_inner 4096), forward only: the sequence-parallel
    forward as chosen automatically, against fixed choices, on contiguous inputs and on z, B, C
    laid out as in the Mamba layer; and mamba_ssm."""
    rows = []
    base = sst.get_config()
    for L in (2048, 8192):
        r = {"shape": f"B1 D4096 N16 L{L} bf16 z softplus"}
        for layout, mk in (("contiguous", make), ("layer views", make_strided)):
            ts = mk(1, L, 4096, 16)
            for name, over in PREFILL_VARIANTS.items():
                if layout != "contiguous" and not name.startswith("auto"):
                    continue
                try:
                    r[f"{name} [{layout}] ms"] = bench_ours(
                        ts, dataclasses.replace(base, **over), bwd=False)["fwd_ms"]
                except Exception as e:  # noqa: BLE001
                    print("prefill variant", name, layout, "failed:", repr(e))
            sst.set_config(base)
        if not no_peer:
            try:
                r["mamba_ssm_ms"] = bench_mamba(make(1, L, 4096, 16), bwd=False)["fwd_ms"]
            except Exception as e:  # noqa: BLE001
                print("mamba_ssm peer failed:", repr(e))
        print(r, flush=True)
        rows.append(r)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument("--out-dir", default=None, help="write OUT_DIR/gpu_selective_scan_<card>_<date>.json")
    p.add_argument("--seqlens", default="2048,8192")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--split-sweep", action="store_true",
                   help="also time forward + backward with 1, 2, 3, 4, 6 and 8 sequence segments")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--no-warm", action="store_true",
                   help="do not compile the sweep's configurations in parallel first")
    p.add_argument("--prefill", action="store_true",
                   help="also time the batch-1 prefill shapes (sequence-parallel forward)")
    a = p.parse_args(argv)
    if a.out_dir and not a.out:
        a.out = result_path(a.out_dir, 'gpu_selective_scan', "cuda")
    bsz, dim, N = 8, 2048, 16
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(info)
    if a.sweep and not a.no_warm:
        base = dataclasses.asdict(sst.get_config())
        # (with a gradient: the forward that saves states compiles too)
        cfgs = [({**base, **c}, False) for c in FWD_SWEEP]
        cfgs += [({**base, **c}, True) for c in GRAD_WARM]
        L0 = int(a.seqlens.split(",")[0])
        warm_compile(cfgs, [(bsz, L0, dim, N)])
    rows = []
    sweep = a.sweep
    for L in map(int, a.seqlens.split(",")):
        ts = make(bsz, L, dim, N)
        fl = floors(bsz, L, dim, N)
        row = {"shape": f"B{bsz} D{dim} N{N} L{L} bf16 z softplus", "L": L, **fl}
        if not a.no_peer:  # the peer first: a sweep cut short by a time limit still has it
            try:
                row["mamba_ssm"] = bench_mamba(ts, bwd=not a.fwd_only)
                print(f"L={L} mamba_ssm: {row['mamba_ssm']}", flush=True)
            except Exception as e:  # noqa: BLE001
                print("mamba_ssm peer failed:", repr(e))
        best = None
        base = sst.get_config()
        for over in (FWD_SWEEP if sweep else [{}]):
            cfg = dataclasses.replace(base, **over)
            try:
                r = bench_ours(make(bsz, L, dim, N), cfg, bwd=False)
            except Exception as e:  # noqa: BLE001
                print("fwd cfg", over, "failed:", e)
                continue
            print(f"L={L} fwd {over or 'default'}: {r['fwd_ms']:.3f} ms "
                  f"(rel. RMS vs fp32 tile {r['rel_rms_vs_tile_fp32']:.1e})", flush=True)
            row.setdefault("fwd_sweep", []).append({"cfg": over, **r})
            if best is None or r["fwd_ms"] < best[1]:
                best = (cfg, r["fwd_ms"])
        bwd_cfgs = BWD_SWEEP if sweep else [{}]
        bbest = None
        if a.fwd_only:
            bwd_cfgs = []
            bbest = (best[0], {"fwd_bwd_ms": float("nan")})
        for over in bwd_cfgs:
            cfg = dataclasses.replace(best[0], **over)
            try:
                r = bench_ours(ts, cfg, bwd=True)
            except Exception as e:  # noqa: BLE001
                print("bwd cfg", over, "failed:", e)
                continue
            print(f"L={L} fwd+bwd {dataclasses.astuple(cfg)}: {r['fwd_bwd_ms']:.3f} ms "
                  f"(fwd {r['fwd_ms']:.3f})", flush=True)
            row.setdefault("bwd_sweep", []).append({"cfg": dataclasses.asdict(cfg), **r})
            if bbest is None or r["fwd_bwd_ms"] < bbest[1]["fwd_bwd_ms"]:
                bbest = (cfg, r)
        if a.split_sweep and not a.fwd_only:
            # segments of the training forward + backward (0 = the automatic rule)
            for nseg in SPLIT_SWEEP:
                cfg = dataclasses.replace(bbest[0], seq_split=nseg)
                try:
                    r = bench_ours(ts, cfg, bwd=True)
                except Exception as e:  # noqa: BLE001
                    print("split", nseg, "failed:", repr(e))
                    continue
                print(f"L={L} fwd+bwd seq_split={nseg}: {r['fwd_bwd_ms']:.3f} ms", flush=True)
                row.setdefault("split_sweep", []).append({"seq_split": nseg, **r})
        if not a.fwd_only:
            # the saved states both ways (the default depends on state_mem_limit): one per
            # coarse_blocks backward blocks (memory-bounded), and one per block (no limit)
            for key, limit in (("fwd_bwd_memory_bounded_ms", 0), ("fwd_bwd_unbounded_ms", 2**62)):
                cfg = dataclasses.replace(bbest[0], state_mem_limit=limit)
                try:
                    r = bench_ours(ts, cfg, bwd=True)
                    row[key] = r["fwd_bwd_ms"]
                    what = (f"one saved state per {cfg.coarse_blocks} blocks" if limit == 0
                            else "one saved state per block")
                    print(f"L={L} fwd+bwd, {what}: {r['fwd_bwd_ms']:.3f} ms", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(key, "failed:", repr(e))
        row["ours_cfg"] = [int(v) for v in dataclasses.astuple(bbest[0])]
        row["ours"] = {"fwd_ms": best[1], "fwd_bwd_ms": bbest[1]["fwd_bwd_ms"]}
        if "mamba_ssm" in row:
            row["ratio_fwd"] = row["ours"]["fwd_ms"] / row["mamba_ssm"]["fwd_ms"]
            if not a.fwd_only:
                row["ratio_fwd_bwd"] = (row["ours"]["fwd_bwd_ms"]
                                        / row["mamba_ssm"]["fwd_bwd_ms"])
        rows.append(row)
        # sweep at the first seqlen only; later seqlens use its best configuration
        sst.set_config(bbest[0] if sweep else base)
        sweep = False
    print("\n| shape | ours fwd ms | mamba_ssm fwd ms | ratio | ours fwd+bwd ms | mamba_ssm fwd+bwd ms "
          "| ratio | floor fwd / fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r.get("mamba_ssm", {})
        print(f"| {r['shape']} | {r['ours']['fwd_ms']:.3f} | {m.get('fwd_ms', float('nan')):.3f} | "
              f"{r.get('ratio_fwd', float('nan')):.2f} | {r['ours']['fwd_bwd_ms']:.3f} | "
              f"{m.get('fwd_bwd_ms', float('nan')):.3f} | "
              f"{r.get('ratio_fwd_bwd', float('nan')):.2f} | "
              f"{r['fwd_floor_ms']:.3f} / {r['fwd_bwd_floor_ms']:.3f} |")
    prefill = bench_prefill(a.no_peer) if a.prefill else []
    if a.out:
        write_json(a.out, {"info": info, "rows": rows, "prefill": prefill})
    return 0


if __name__ == "__main__":
    sys.exit(main())
