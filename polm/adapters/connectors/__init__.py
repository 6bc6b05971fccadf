"""Connectors: the modules that carry encoder features into a language model."""
