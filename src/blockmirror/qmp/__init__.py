"""QMP: the sans-IO wire protocol, the session state machine, the command registry and schema,
and the asyncio server."""
