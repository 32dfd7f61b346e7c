"""Caches, sampling and generation (prefill, decode_one_token, generate)."""

from ssmkit.inference.cache import InferenceCache, allocate_cache  # noqa: E402,F401
from ssmkit.inference.generate import decode_one_token, generate, prefill  # noqa: E402,F401
from ssmkit.inference.sampling import sample  # noqa: E402,F401
