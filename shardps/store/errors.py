"""The one domain exception; everything else is a built-in type."""


class ShardUnavailableError(RuntimeError):
    """A parameter shard died and could not be reached (restarts exhausted)."""
