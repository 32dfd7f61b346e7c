"""Compile a Triton kernel for sm_90 on a machine without a GPU and print its resources.

Registers, spills, shared memory and the layouts Triton chose (from the TTGIR) — what the device
time would otherwise be spent finding out. Used while tuning the selective-scan kernels:

    python benchmarks/kernel_report.py fwd BLOCK_D=8 K=16 G=4 num_warps=1
    python benchmarks/kernel_report.py bwd BLOCK_D=32 K=8 num_warps=2 --ttgir
    python benchmarks/kernel_report.py gemv BLOCK_N=2 BLOCK_K=2048 num_warps=4   # decode kernels
    python benchmarks/kernel_report.py bwd_quad maxnreg=128 num_warps=4 --loops
    python benchmarks/kernel_report.py ssd_bwd_dbc num_warps=4 num_stages=2         # SSD kernels
    python benchmarks/kernel_report.py ssd_step num_warps=4          # SSD decode step (H P N 64 128)
    python benchmarks/kernel_report.py gated_norm_bwd BLOCK=2048 num_warps=8        # Mamba-2's norm
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssmkit.ops.fused import decode as decode_triton  # noqa: E402
from ssmkit.ops.fused import gated_norm  # noqa: E402
from ssmkit.ops.fused import gemv as gemv_triton  # noqa: E402
from ssmkit.ops.selective_scan import triton_split_state as tq  # noqa: E402
from ssmkit.ops.selective_scan import triton_split_state_bwd as tqb  # noqa: E402
from ssmkit.ops.selective_scan import triton_tile as tk  # noqa: E402
from ssmkit.ops.ssd import step_triton as ssd_step  # noqa: E402
from ssmkit.ops.ssd import triton_fused_chunk as sdk  # noqa: E402

SCALARS = {"L", "dim", "dstate", "ngroups", "blocks_per_group", "nchunks_per_seq", "total_rows",
           "seg_len", "nseg", "z_rs", "b_rs", "c_rs"}

KERNELS = {
    "fwd": (tk.selective_scan_fwd_tile_kernel, dict(
        HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_H0=False, STORE_HT=False,
        SAVE_STATES=False, IS_VARLEN=False, USE_F64=False, BLOCK_N=16, BLOCK_D=32, K=8, G=4,
        EVEN_D=True, EVEN_N=True, STORE_Y=True, STORE_DSUM=False, PACK=2, KS=0)),
    "fwd_save": (tk.selective_scan_fwd_tile_kernel, dict(
        HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_H0=False, STORE_HT=False,
        SAVE_STATES=True, IS_VARLEN=False, USE_F64=False, BLOCK_N=16, BLOCK_D=32, K=8, G=4,
        EVEN_D=True, EVEN_N=True, STORE_Y=True, STORE_DSUM=False, PACK=2, KS=4)),
    "bwd": (tk.selective_scan_bwd_kernel, dict(
        HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_DHT=False, IS_VARLEN=False,
        USE_F64=False, BLOCK_N=16, BLOCK_D=16, K=4)),
    "fwd_quad": (tq.selective_scan_fwd_quad_kernel, dict(
        HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_H0=False, STORE_HT=False,
        SAVE_STATES=False, IS_VARLEN=False, USE_F64=False, Q=4, S=4, K=16, KS=8, PF=3,
        EVEN_D=True, STORE_Y=True, STORE_DSUM=False, PACK=2, VEC=2, IS_BF16=True,
        DIM_C=2048, ZRS_C=4096, BRS_C=160, CRS_C=160, STATE_DN=0, A_DN=16)),
    "bwd_quad": (tqb.selective_scan_bwd_quad_kernel, dict(
        HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_DHT=False, IS_VARLEN=False,
        USE_F64=False, Q=4, S=4, K=4, EVEN_D=True, PACK=2, IS_BF16=True, V=8, VEC=2,
        DIM_C=2048, W=4, M=1, STATE_DN=1, BCS_C=16, DBIAS=1, A_DN=16, XW=0)),
    "adjoint_local": (tk.adjoint_local_kernel, dict(
        HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, USE_F64=False, BLOCK_D=32, N=16, K=4,
        EVEN_D=True, PACK=2, IS_BF16=True)),
}

# SSD kernels (bf16 x, B, C, z; B8 H32 P64 G1 N128 shapes): constexprs and pointer types.
_SSD_BASE = dict(VARLEN=False, DT_SOFTPLUS=True, IEEE=False, BLOCK_Q=64, BLOCK_P=64, BLOCK_N=128)
_SSD_HALF = ("x_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "dx_ptr", "dz_ptr", "dB_ptr",
             "dC_ptr", "dt_ptr", "ddt_ptr")
_SSD = {
    "ssd_fwd": (sdk._ssd_fwd, dict(HAS_D=True, D_PER_CHANNEL=False, HAS_Z=True, HAS_BIAS=True,
                                   HAS_H0=False, STORE_HT=False, **_SSD_BASE)),
    "ssd_states_fwd": (sdk._ssd_states_fwd, dict(HAS_BIAS=True, HAS_H0=False, STORE_HT=False, **_SSD_BASE)),
    "ssd_fwd_chunk": (sdk._ssd_fwd_chunk, dict(HAS_D=True, D_PER_CHANNEL=False, HAS_Z=True, HAS_BIAS=True,
                                               **_SSD_BASE)),
    "ssd_dstates_bwd": (sdk._ssd_dstates_bwd, dict(HAS_Z=True, HAS_BIAS=True, HAS_H0=False, HAS_DHT=False,
                                                   **_SSD_BASE)),
    "ssd_bwd": (sdk._ssd_bwd, dict(HAS_D=True, D_PER_CHANNEL=False, HAS_Z=True, HAS_BIAS=True, **_SSD_BASE)),
    "ssd_bwd_dbc": (sdk._ssd_bwd_dbc, dict(HAS_BIAS=True, **_SSD_BASE)),
}

# Decode kernels (bf16 model, float32 states): constexprs and the pointer types of their
# arguments (every other argument is an i32).
_DECODE = {
    "gemv": (lambda: gemv_triton._kernel(), dict(
        NORM=True, HAS_RES=True, USE_F64=False, PDL=True, BLOCK_N=8, BLOCK_K=1024),
        dict(X="*bf16", RES="*fp32", NW="*bf16", W="*bf16", Y="*bf16", RES_OUT="*fp32", eps="fp32")),
    "conv_proj": (lambda: decode_triton._kernels()[2], dict(
        WIDTH=4, HAS_BIAS=True, SILU=True, PDL=True, BLOCK_D=256, BLOCK_O=32),
        dict(X="*bf16", STATE="*bf16", W_="*bf16", BIAS="*bf16", XS="*bf16", PW="*bf16",
             PARTS="*fp32")),
    "ssm_parts": (lambda: decode_triton._kernels()[3], dict(
        HAS_D=True, HAS_Z=True, HAS_BIAS=True, PDL=True, BLOCK_D=32, BLOCK_N=16, BLOCK_R=128,
        BLOCK_P=16),
        dict(STATE="*fp32", X="*bf16", PARTS="*fp32", A="*fp32", D="*fp32", Z="*bf16",
             DT_BIAS="*bf16", WDT="*bf16", Y="*bf16")),
    "ssd_step": (lambda: ssd_step._kernel(), dict(
        HAS_D=True, D_PER_CHANNEL=False, HAS_Z=False, HAS_BIAS=True, HAS_SBI=True, SOFTPLUS=True,
        BLOCK_P=16, BLOCK_N=128),
        dict(STATE="*fp32", X="*bf16", DT="*bf16", A="*fp32", B="*bf16", C="*bf16", D="*fp32",
             Z="*bf16", DT_BIAS="*fp32", SBI="*i32", Y="*bf16", dt_min="fp32", dt_max="fp32")),
    "gated_norm_fwd": (lambda: gated_norm._kernels()[0], dict(HAS_Z=True, NORM_BEFORE_GATE=False, BLOCK=2048),
                       dict(X="*bf16", Z="*bf16", W="*fp32", Y="*bf16", RSTD="*fp32", eps="fp32")),
    "gated_norm_bwd": (lambda: gated_norm._kernels()[1], dict(HAS_Z=True, NORM_BEFORE_GATE=False, BLOCK=2048),
                       dict(X="*bf16", Z="*bf16", W="*fp32", RSTD="*fp32", DY="*bf16", DX="*bf16",
                            DZ="*bf16", DW_PART="*fp32")),
}


def _signature(name: str, consts: dict):
    """(kernel, {argument: type}) for a kernel of KERNELS, _SSD or _DECODE."""
    if name in _SSD:
        import triton.language as tl

        consts["CDT"] = tl.float32
        fn = _SSD[name][0]
        sig = {}
        for p in fn.arg_names:
            if p in consts:
                sig[p] = "constexpr"
            elif p.endswith("_ptr"):
                sig[p] = ("*bf16" if p in _SSD_HALF and not consts.get("IEEE") else "*i32" if p in ("cu_ptr", "choff_ptr")
                          else "*fp32")
            else:
                sig[p] = "fp32" if p in ("dt_min", "dt_max") else "i32"
        return fn, sig
    if name in _DECODE:
        get_fn, _, types = _DECODE[name]
        fn = get_fn()
        return fn, {p: "constexpr" if p in consts else types.get(p, "i32") for p in fn.arg_names}
    fn = KERNELS[name][0]
    sig = {}
    for p in fn.arg_names:
        if p in consts:
            sig[p] = "constexpr"
        elif p not in SCALARS:
            half = ("X", "DT", "Z", "Y", "DY", "DX", "DDT", "DZ")
            if not name.endswith("32"):
                half += ("B", "C")
            sig[p] = "*bf16" if p in half else "*fp32"
            if p in ("CU", "CHUNK_OFF"):
                sig[p] = "*i64"
        else:
            sig[p] = "i32"
    return fn, sig


def loop_counts(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """``(start, end, opcode counts)`` of every loop in a SASS listing (the span from a backward
    branch's target to the branch): the instructions a kernel spends per iteration of its main
    loops, what most of the tuning of the scan kernels was read from."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", ln)]
    addr = [int(re.match(r"\s*/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    out = []
    for a, ln in zip(addr, lines):
        m = re.search(r"BRA (0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < a:
            start = int(m.group(1), 16)
            ops = collections.Counter(
                re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", body).group(2)
                for b, body in zip(addr, lines) if start <= b <= a)
            out.append((start, a, ops))
    return out


def report(name: str, overrides: dict, num_warps: int, show_ttgir: bool, disasm: bool = False,
           maxnreg: int | None = None, loops: bool = False, num_stages: int | None = None) -> dict:
    table = _DECODE if name in _DECODE else _SSD if name in _SSD else KERNELS
    consts = {**table[name][1], **overrides}
    fn, sig = _signature(name, consts)
    # As a launch would: pointers 16-byte aligned, int arguments divisible by 16 (dim, dstate)
    # specialised as such; ngroups (1) and the lengths are left unknown.
    attrs = {}
    for i, p in enumerate(fn.arg_names):
        if sig.get(p, "").startswith("*") or p in ("dim", "dstate", "z_rs", "b_rs", "c_rs"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn, sig, consts, attrs)
    except TypeError:
        src = ASTSource(fn, sig, consts)
    opts = {"num_warps": num_warps}
    if num_stages:
        opts["num_stages"] = num_stages
    if maxnreg:
        opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    md = k.metadata
    out = {"shared": md.shared}
    ptx = k.asm["ptx"]
    out["ptx_ex2"] = len(re.findall(r"ex2\.approx", ptx))
    out["ptx_shfl"] = len(re.findall(r"shfl\.sync", ptx))
    out["ptx_bar"] = len(re.findall(r"bar\.sync|barrier\.sync", ptx))
    out["ptx_ld_global"] = len(re.findall(r"ld\.global", ptx))
    out["ptx_st_global"] = len(re.findall(r"st\.global", ptx))
    ttgir = k.asm["ttgir"]
    out["layouts"] = sorted(set(re.findall(r"#(?:blocked\d*) = (#ttg\.blocked<[^>]*>)", ttgir)))
    if show_ttgir:
        print(ttgir)
    # Registers and spills: the resource usage of the cubin Triton built (cuobjdump ships with it).
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.cubin")
        with open(f, "wb") as fh:
            fh.write(k.asm["cubin"])
        r = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", f],
                           capture_output=True, text=True)
        if disasm or loops:
            sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f],
                                  capture_output=True, text=True).stdout
            if disasm:
                print(sass)
            for start, end, ops in loop_counts(sass) if loops else ():
                print(f"loop {start:#x}-{end:#x}: {sum(ops.values())} instructions; "
                      + " ".join(f"{k}:{v}" for k, v in ops.most_common(14)))
    m = re.search(r"REG:(\d+)", r.stdout)
    out["n_regs"] = int(m.group(1)) if m else r.stdout[-300:] + r.stderr[-300:]
    m = re.search(r"LOCAL:(\d+)", r.stdout)
    out["local_bytes"] = int(m.group(1)) if m else None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=sorted(KERNELS) + sorted(_SSD) + sorted(_DECODE))
    ap.add_argument("params", nargs="*", help="NAME=VALUE constexpr overrides; num_warps=N")
    ap.add_argument("--ttgir", action="store_true")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--loops", action="store_true",
                    help="instructions per iteration of each loop, by opcode (from the SASS)")
    a = ap.parse_args(argv)
    over, nw, maxnreg, ns = {}, 1, None, None
    for p in a.params:
        k, v = p.split("=")
        if k == "num_warps":
            nw = int(v)
        elif k == "maxnreg":
            maxnreg = int(v)
        elif k == "num_stages":
            ns = int(v)
        else:
            over[k] = int(v) if v.lstrip("-").isdigit() else (v == "True")
    r = report(a.kernel, over, nw, a.ttgir, a.sass, maxnreg, a.loops, ns)
    for k, v in r.items():
        if k == "layouts":
            for lay in v:
                print("  ", lay)
        else:
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
