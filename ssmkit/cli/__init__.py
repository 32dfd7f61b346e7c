"""ssmkit.cli."""
