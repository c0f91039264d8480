"""Training-loop controllers and helpers."""

from callbacks.ddi_annealing import DDIAnnealing
from callbacks.epoch_timer import EpochTimer
from callbacks.pid_ddi import PIDDDIController
from callbacks.recommendation_writer import RecommendationWriter

__all__ = ["EpochTimer", "PIDDDIController", "DDIAnnealing", "RecommendationWriter"]
