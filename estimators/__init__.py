"""Online estimators of the arrival rate, type mix and service model (pure)."""

__all__: list[str] = []
