"""The polm engine: hooks, plugin manager, registries, pipeline, training loop, CLI."""
