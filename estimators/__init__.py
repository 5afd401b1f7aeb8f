"""Online estimators of the arrival rate, type mix, service model, answers and accuracy (pure).

Every estimator has one shape: ``update(..., now=t)`` records one observation made at time
``t`` (seconds, never going back) and ``get(now=None)`` reads the estimate at a time no
earlier than the last update (default: that time). Time-decayed estimators (:class:`ArrivalRate`,
:class:`TypeMix`) move between updates; those that forget per observation read the same at
any later time. Hyperparameters are public attributes under their constructor names.
"""

from thinkcap.estimators.accuracy import AccuracyCurve
from thinkcap.estimators.answer import AnswerLength, UsedShare
from thinkcap.estimators.arrival import ArrivalRate, RateEstimate
from thinkcap.estimators.mix import TypeMix
from thinkcap.estimators.service import ServiceRLS
from thinkcap.estimators.service_model import ServiceModel, ServiceParams
from thinkcap.estimators.snapshot import Estimators, Snapshot, TypeEstimate
from thinkcap.estimators.step import GapTally, StepEstimate, StepFit

__all__ = [
    "AccuracyCurve",
    "AnswerLength",
    "ArrivalRate",
    "Estimators",
    "GapTally",
    "RateEstimate",
    "ServiceModel",
    "ServiceParams",
    "ServiceRLS",
    "Snapshot",
    "StepEstimate",
    "StepFit",
    "TypeEstimate",
    "TypeMix",
    "UsedShare",
]
