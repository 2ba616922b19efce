"""Exports: the NBD server that serves live nodes to NBD clients."""
