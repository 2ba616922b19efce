"""Helpers for the mirror tests: an in-memory format driver and the differential QMP scripts."""
