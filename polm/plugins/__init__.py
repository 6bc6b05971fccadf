"""The post-training paradigms, each a built-in plugin."""
