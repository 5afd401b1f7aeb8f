"""Online estimators of the arrival rate, type mix, service model and accuracy (pure)."""

from thinkcap.estimators.accuracy import AccuracyCurve
from thinkcap.estimators.arrival import ArrivalRate, RateEstimate
from thinkcap.estimators.mix import TypeMix
from thinkcap.estimators.service import ServiceRLS
from thinkcap.estimators.service_model import ServiceModel, ServiceParams
from thinkcap.estimators.snapshot import Estimators, Snapshot, TypeEstimate

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
