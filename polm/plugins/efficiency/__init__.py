"""The efficiency paradigm."""
