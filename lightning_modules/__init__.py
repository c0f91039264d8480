"""One LightningModule per method, on the shared base ``MedRecModule``."""

from lightning_modules.base import MedRecModule
from lightning_modules.logistic_regression import LogisticRegression
from lightning_modules.nearest import DrugFrequency, Nearest
from lightning_modules.retain import RETAIN

__all__ = ["MedRecModule", "LogisticRegression", "DrugFrequency", "Nearest", "RETAIN"]
