"""QMP: the sans-IO wire protocol, the session state machine, the command handlers and the
asyncio server. What the commands take and return is declared in ``blockmirror.qapi``."""
