"""Experiments built on ett_ds and data_tools (not part of the library). Run from the repository root."""
