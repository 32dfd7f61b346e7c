"""ssmkit.training."""
