"""The integration paradigm."""
