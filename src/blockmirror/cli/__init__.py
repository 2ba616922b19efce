"""The `blockmirror` command line."""
