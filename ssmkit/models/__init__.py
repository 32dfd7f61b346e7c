"""Model configs, blocks, the language model and checkpoint formats."""
