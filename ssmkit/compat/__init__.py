"""ssmkit.compat."""
