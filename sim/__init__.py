"""Stand-ins for the outside world: simulated server, queue simulator, load generator."""

__all__: list[str] = []
