"""ssmkit.theory."""
