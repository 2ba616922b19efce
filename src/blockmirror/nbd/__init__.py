"""The sans-IO NBD codec shared by the export (server) and the nbd block driver (client)."""
