"""Caches, sampling and generation (prefill, decode_one_token, generate)."""

from ssmkit.inference.cache import InferenceCache, allocate_cache  # noqa: E402,F401
from ssmkit.inference.generate import generate  # noqa: F401
from ssmkit.inference.sampling import sample  # noqa: E402,F401
from ssmkit.inference.stages import decode_one_token, prefill  # noqa: F401
