"""One LightningModule per method, on the shared base ``MedRecModule``."""

from lightning_modules.base import MedRecModule
from lightning_modules.cognet import COGNet
from lightning_modules.dpr import DPRAG, DPRWG
from lightning_modules.gamenet import GAMENet
from lightning_modules.leap import LEAP
from lightning_modules.logistic_regression import LogisticRegression
from lightning_modules.micron import MICRON
from lightning_modules.miranda import MiranDa, MiranDaPredictor
from lightning_modules.molerec import MoleRec
from lightning_modules.nearest import DrugFrequency, Nearest
from lightning_modules.raremed import RAREMed
from lightning_modules.retain import RETAIN
from lightning_modules.safedrug import SafeDrug
from lightning_modules.updater import PrescriptionUpdater

__all__ = [
    "MedRecModule",
    "DrugFrequency",
    "Nearest",
    "LogisticRegression",
    "RETAIN",
    "SafeDrug",
    "GAMENet",
    "MiranDa",
    "MiranDaPredictor",
    "DPRWG",
    "DPRAG",
    "RAREMed",
    "MICRON",
    "LEAP",
    "MoleRec",
    "COGNet",
    "PrescriptionUpdater",
]
