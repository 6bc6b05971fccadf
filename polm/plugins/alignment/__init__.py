"""The alignment paradigm."""
