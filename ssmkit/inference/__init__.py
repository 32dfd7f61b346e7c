"""Caches, sampling and generation (prefill, decode_one_token, generate)."""
