"""Result files of the benchmark programs: :mod:`ssmkit.bench.results` (atomic JSON, card + date
names), loaded from this checkout by its path so that it works before ``ssmkit`` is importable."""

import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ssmkit", "bench", "results.py")
_spec = importlib.util.spec_from_file_location("_ssmkit_bench_results", _path)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

result_path = _mod.result_path
write_json = _mod.write_json
cpu_name = _mod.cpu_name
