"""Recipes shipped with polm (the quickstart)."""
