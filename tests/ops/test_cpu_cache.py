"""Cache sizes read from /sys (or the fallbacks) and the scan's chunk length chosen from them."""

from ssmkit.ops import cpu_cache
from ssmkit.ops.selective_scan import chunked


def test_parse_size():
    assert cpu_cache._parse_size("1024K\n") == 1 << 20
    assert cpu_cache._parse_size("32M") == 32 << 20
    assert cpu_cache._parse_size("49152") == 49152


def test_cache_sizes_are_positive_and_grow_with_level():
    sizes = cpu_cache.cache_sizes()
    assert sizes and all(v > 0 for v in sizes.values())
    levels = sorted(sizes)
    assert [sizes[k] for k in levels] == sorted(sizes[k] for k in levels)
    assert cpu_cache.last_level_cache_bytes() == sizes[levels[-1]]


def test_fallback_without_sys(monkeypatch):
    monkeypatch.setattr(cpu_cache, "_SYS", "/nonexistent")
    cpu_cache.cache_sizes.cache_clear()
    try:
        assert cpu_cache.cache_sizes() == cpu_cache.FALLBACK_BYTES
    finally:
        cpu_cache.cache_sizes.cache_clear()


def test_chunk_steps_shrink_with_the_working_set(monkeypatch):
    monkeypatch.setattr(chunked, "last_level_cache_bytes", lambda: 32 << 20)
    assert chunked.chunk_steps(1, 1536, 16) == 32  # 2 x 96 KiB a step, within 8 MiB
    assert chunked.chunk_steps(1, 64, 4) == 64
    assert chunked.chunk_steps(64, 4096, 16) == 8  # never below 8
