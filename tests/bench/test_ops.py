"""ssmkit.bench (behind ``ssmkit bench``): runs from the installed package, writes whole JSON files
named by the machine and the date. A program, not a timed test: nothing here asserts a time."""

import json
import re

from ssmkit.bench import ops
from ssmkit.bench.results import result_path


def test_bench_ops_cpu_writes_json_to_out_dir(tmp_path):
    assert ops.main(["--device", "cpu", "--ops", "causal_conv1d", "--seqlens", "16", "--no-bwd",
                     "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    assert re.fullmatch(r"ops_cpu_\d{4}-\d{2}-\d{2}\.json", path.name)
    res = json.loads(path.read_text())
    assert {r["backend"] for r in res["rows"]} == {"chunked", "reference"}
    assert all(r["fwd_ms"] > 0 for r in res["rows"])


def test_result_path_creates_the_folder(tmp_path):
    p = result_path(tmp_path / "new", "gpu_x", "cpu")
    assert (tmp_path / "new").is_dir() and p.endswith(".json") and "_cpu_" in p
