"""Connectors and domain adapters (a built-in plugin; the connectors arrive with multimodal support)."""
