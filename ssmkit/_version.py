"""The package version (one place, read by ssmkit.__version__ and the checkpoint writer)."""

__version__ = "0.1.0"
