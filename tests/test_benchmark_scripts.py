"""Smoke tests of the benchmark programs that can run without a GPU (they are programs, not
timed tests: nothing here asserts a time)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_generation_cpu_smoke(tmp_path):
    out = tmp_path / "prof.json"
    prof = _load("profile_generation")
    assert prof.main(["--device", "cpu", "--tiny", "--prompt", "16", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["prefill"]["wall_ms"] > 0 and res["prefill"]["top"]


@pytest.mark.triton
def test_generation_counts_mamba2_decode_launches():
    gen = _load("generation")
    res = gen.count_launches(n_layer=2, ssm="mamba2")
    by_op = res["cuda_path"]["by_op"]
    assert by_op["triton:ssd_step"] == 2 and res["cuda_path"]["total"] <= 5 * 2 + 3, by_op
    with pytest.raises(SystemExit):  # a bad --backends is one argparse error
        gen.main(["--backends", "cuda"])


def test_llama_cpp_decode_smoke(tmp_path):
    import pytest

    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    bench = _load("_llama_cpp")
    out = tmp_path / "llama"
    assert bench.main(["--preset", "tiny-mamba2", "--dtypes", "f32,q8_0", "--threads", "1", "--new", "4",
                       "--repeat", "1", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    assert res["llama.cpp f32, 1 thread"]["greedy_agreement_with_ssmkit"] == 1.0
    assert set(res) == {"ssmkit f32, 1 thread", "llama.cpp f32, 1 thread", "llama.cpp q8_0, 1 thread"}


def test_cpu_floor_smoke(tmp_path):
    out = tmp_path / "floor.json"
    floor = _load("cpu_floor")
    assert floor.main(["--models", "mamba", "--threads", "1", "--seqlen", "32", "--repeats", "1",
                       "--no-decode", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["prefill"]
    assert row["model"] == "mamba" and row["mode"] == "eager" and row["floor_ms"] > 0


@pytest.mark.slow
def test_context_parallel_cpu_smoke(tmp_path):
    """(Marked slow: 2 spawned processes; the context-parallel code itself is tested in
    tests/ops, tests/models and tests/training.)"""
    import sys

    # imported by name (not from a path) so that the spawned ranks can import it too
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import context_parallel as bench
    finally:
        sys.path.pop(0)
    assert bench.main(["--ranks", "1", "2", "--start-seqlen", "32", "--max-seqlen", "64", "--steps", "1",
                       "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("context_parallel_cpu_*.json")
    res = json.loads(path.read_text())
    assert set(res["ranks"]) == {"1", "2"} and res["machine"]
    assert [r["seqlen"] for r in res["ranks"]["2"]["rows"]] == [32, 64]


def test_mamba3_cpu_smoke(tmp_path):
    out = tmp_path / "m3.json"
    bench = _load("mamba3_cpu")
    assert bench.main(["--tiny", "--seqlen", "32", "--decode-tokens", "2", "--threads", "1", "--repeats", "1",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"mamba2-tiny", "mamba3-tiny", "mamba3-mimo4-tiny"}
    assert all(r["decode_tok_per_s"] > 0 and r["floor_s"] > 0 for r in rows)


@pytest.mark.slow
def test_multi_gpu_cpu_two_processes(tmp_path):
    """benchmarks/multi_gpu.py end to end at tiny sizes: one process (the loss curve and its
    checkpoint), then 2 gloo processes against it (loss curves, weak scaling, 1 -> 2 resume,
    context parallelism), then 2 -> 1. (Marked slow: ~30 s of spawned processes; resuming on
    another number of ranks is tested in tests/training/test_multi_process.py.)"""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # by name: the spawned ranks import it
    try:
        import multi_gpu as bench
    finally:
        sys.path.pop(0)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    flags = ["--device", "cpu", "--preset", "tiny-hybrid", "--seqlen", "16", "--global-batch", "4",
             "--micro-batch", "2", "--steps", "3", "--last", "2", "--resume-at", "1", "--resume-steps", "2",
             "--timed-steps", "1", "--warmup-steps-timing", "0", "--cp-preset", "tiny-mamba2",
             "--cp-start-seqlen", "32", "--cp-max-seqlen", "32", "--cp-steps", "1", "--cp-check-seqlen", "32",
             "--ckpt-dir", str(ckpt),
             "--out-dir", str(out)]
    assert bench.main(flags + ["--parts", "loss"]) == 0
    (base,) = out.glob("multi_gpu_1rank_cpu_*.json")
    assert bench.main(flags + ["--nproc", "2", "--baseline", str(base), "--resume-from-ranks", "1"]) == 0
    (two,) = out.glob("multi_gpu_2rank_cpu_*.json")
    res = json.loads(two.read_text())
    assert res["ranks"] == 2 and res["backend"] == "gloo" and res["machine"]
    for strategy in ("ddp", "fsdp"):
        assert res["loss"][strategy]["pass"] and len(res["loss"][strategy]["losses"]) == 3
        assert res["scaling"][strategy]["tokens_per_s_per_gpu"] > 0
        assert res["resume"][f"{strategy}<-single1"]["pass"]
    assert [r["seqlen"] for r in res["context_parallel"]["rows"]] == [32]
    check = res["context_parallel"]["equals_1gpu"]  # float32 on the CPU
    assert check["pass"] and check["grad_rel_diff"] < 1e-5 and check["loss_rel_diff"] < 1e-5, check
    assert two.with_suffix(".png").exists() or "matplotlib" not in sys.modules
    # the 2-rank checkpoints, resumed by one process against the one-process curve
    assert bench.main(flags + ["--parts", "resume", "--resume-from-ranks", "2", "--baseline", str(base)]) == 0
    res = json.loads(base.read_text())
    assert all(r["pass"] for r in res["resume"].values()) and set(res["resume"]) == {"single<-ddp2", "single<-fsdp2"}


def test_mamba2_vs_mamba1_cpu_smoke(tmp_path):
    bench = _load("mamba2_vs_mamba1")
    assert bench.main(["--device", "cpu", "--d-model", "64", "--batch", "1", "--seqlens", "32,64",
                       "--reps", "1", "--warmup", "1", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("mamba2_vs_mamba1_*.json")
    res = json.loads(path.read_text())
    assert res["seqlens"] == [32, 64] and set(res["ms"]) == {"Mamba-1 (N 16)", "Mamba-2 (N 64)", "Mamba-2 (N 128)"}
    assert all(len(v) == 2 and min(v) > 0 for v in res["ratio_mamba1_over_mamba2"].values())


def test_train_step_gpu_reports_fla_missing_as_a_refusal():
    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla is installed")
    bench = _load("train_step_gpu")
    assert "gated-deltanet" in bench.VARIANTS
    assert "fla is not installed" in bench._one("fla", None)["refused"]


def test_delta_rule_gpu_reports_fla_missing_per_case(tmp_path):
    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla is installed")
    bench = _load("delta_rule_gpu")
    cases = [("B8 H16 K128 V128", 64), ("B8 H8 Hv16 K128 V128", 128)]
    res = bench.peer("gated", cases, 120, str(tmp_path / "cache"))  # fla's process, without fla
    assert set(res) == set(cases) and all("No module named 'fla'" in r["refused"] for r in res.values())
