"""QMP command handlers, one module per area (cf. QEMU's qapi modules)."""
