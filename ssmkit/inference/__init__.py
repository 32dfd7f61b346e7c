"""ssmkit.inference."""
