"""Online estimators of the arrival rate, type mix, service model and accuracy (pure)."""

from estimators.accuracy import AccuracyCurve
from estimators.arrival import ArrivalRate, RateEstimate
from estimators.mix import TypeMix
from estimators.service import ServiceRLS
from estimators.service_model import ServiceModel, ServiceParams
from estimators.snapshot import Estimators, Snapshot, TypeEstimate

__all__ = [
    "AccuracyCurve",
    "ArrivalRate",
    "Estimators",
    "RateEstimate",
    "ServiceModel",
    "ServiceParams",
    "ServiceRLS",
    "Snapshot",
    "TypeEstimate",
    "TypeMix",
]
