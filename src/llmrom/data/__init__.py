"""Calibration and evaluation text: built-in pydoc topics (frozen here), files, folders, datasets, windows.
May import: errors only."""
