"""Experiments: the scenario's stages and the demo that chains them."""
