"""Online estimators of the arrival rate, type mix and service model (pure)."""

from estimators.arrival import ArrivalRate, RateEstimate
from estimators.mix import TypeMix
from estimators.service import ServiceRLS
from estimators.service_model import ServiceModel, ServiceParams

__all__ = ["ArrivalRate", "RateEstimate", "ServiceModel", "ServiceParams", "ServiceRLS", "TypeMix"]
