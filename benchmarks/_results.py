"""Result files of the benchmark programs: ``ssmkit.bench.results`` (atomic JSON, card + date names)."""

from ssmkit.bench.results import result_path, write_json  # noqa: F401
