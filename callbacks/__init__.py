"""Training-loop controllers and helpers."""

from callbacks.ddi_annealing import DDIAnnealing
from callbacks.ddi_control import DDIController
from callbacks.ddi_weight_annealing import DDIWeightAnnealing
from callbacks.epoch_timer import EpochTimer
from callbacks.pid_ddi import PIDDDIController
from callbacks.recommendation_writer import RecommendationWriter

__all__ = [
    "EpochTimer",
    "DDIController",
    "PIDDDIController",
    "DDIAnnealing",
    "DDIWeightAnnealing",
    "RecommendationWriter",
]
