"""Benchmarks shipped with the package (``ssmkit bench``): ops x backends x seqlens.

``registry`` times every registered case the same way on every machine, ``ops`` registers the
selective scan, causal conv1d and SDPA attention (as the quadratic peer), ``results`` writes JSON
atomically under a name that carries the card and the date. The GPU programs that compare with
peer libraries (``benchmarks/*.py`` in a source checkout) build on the same pieces.
"""
