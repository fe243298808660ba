"""The terminal dashboard `dallm-tui`."""
