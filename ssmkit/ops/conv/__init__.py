"""Convolutions over time (causal depthwise conv1d for Mamba; FFT convolution for LTI SSMs)."""
