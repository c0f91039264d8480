"""Recommendations out of a trained model: per-visit records and a small Python API.

from lightning_modules.recommend import Recommender
rec = Recommender.from_checkpoint("runs/.../best.ckpt")
rec.recommend([{"diagnoses": ["4019", "42731"], "procedures": ["3893"], "medications": ["B01A"]},
               {"diagnoses": ["4280"], "procedures": ["3893"]}])
# -> {"drugs": [...], "drug_names": [...], "probabilities": [...], "ddi_pairs": [[a, b], ...]}
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from typing import Literal

import numpy as np
import torch

from datamodules.cohort import CohortError
from datamodules.knowledge import CohortKnowledge
from datamodules.safe_pickle import load_checkpoint
from datamodules.visit_sequence import GENDER_CODES, VisitCollator

MODEL_CLASS_KEY = "medrec_model_class"


def visit_record(probs: torch.Tensor, threshold: float, knowledge: CohortKnowledge) -> dict:
    """Recommended drugs of one visit (probability >= threshold), best first, with DDI pairs flagged."""
    chosen = (probs >= threshold).nonzero().flatten()
    chosen = chosen[torch.argsort(probs[chosen], descending=True, stable=True)].tolist()
    codes = knowledge.vocab["medication"]
    names = knowledge.medication_names
    ddi = knowledge.ddi_adj
    return {
        "drugs": [codes[d] for d in chosen],
        "drug_names": [names[d] for d in chosen] if names else [],
        "probabilities": [round(float(probs[d]), 4) for d in chosen],
        "ddi_pairs": [
            [codes[a], codes[b]] for i, a in enumerate(chosen) for b in chosen[i + 1 :] if ddi[a, b] or ddi[b, a]
        ],
    }


def load_model(path: str, map_location: str | torch.device = "cpu", kind: type | None = None):
    """The model a medrec checkpoint holds, as the class it was trained as; ``kind``: the class it must be."""
    checkpoint = load_checkpoint(path, map_location=map_location)  # weights_only: no code runs
    class_path = checkpoint.get(MODEL_CLASS_KEY) if isinstance(checkpoint, dict) else None
    if class_path is None:
        raise CohortError(f"{path}: not a medrec checkpoint (no {MODEL_CLASS_KEY})")
    module, _, name = class_path.rpartition(".")
    if not module.startswith("lightning_modules."):  # importing another module could run its code
        raise CohortError(f"{path}: names model class {class_path!r}, which is not a medrec model")
    model_class = getattr(importlib.import_module(module), name, None)
    if not isinstance(model_class, type):
        raise CohortError(f"{path}: names model class {class_path!r}, which this medrec does not have")
    if kind is not None and not issubclass(model_class, kind):
        raise CohortError(f"{path}: a {name} checkpoint, where a {kind.__name__} checkpoint is needed")
    return model_class.from_checkpoint(path, map_location=map_location)


class UnknownCodeError(CohortError):
    """A code given to the recommender is outside the model's vocabulary."""


class VisitInputError(CohortError):
    """Visits given to ``Recommender.recommend`` that do not have the documented shape."""


VISIT_KEYS = {"diagnoses", "procedures", "medications", "labs", "age", "los", "gender"}


def check_visits(visits) -> None:
    """Raise VisitInputError naming the visit, the key and the rule of the first malformed part."""
    if not isinstance(visits, (list, tuple)):
        raise VisitInputError(f"visits must be a list of visit dicts, got a {type(visits).__name__}")
    for t, visit in enumerate(visits):
        if not isinstance(visit, dict):
            raise VisitInputError(f"visit {t} must be a dict of codes (keys {sorted(VISIT_KEYS)}), got {visit!r:.60}")
        for key, value in visit.items():
            if key not in VISIT_KEYS:
                close = difflib.get_close_matches(str(key), VISIT_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(VISIT_KEYS)}"
                raise VisitInputError(f"visit {t} has unknown key {key!r}{hint}")
            if key in ("diagnoses", "procedures", "medications", "labs"):
                if not isinstance(value, (list, tuple, set)) or not all(isinstance(c, str) for c in value):
                    raise VisitInputError(f"visit {t} {key!r} must be a list of code strings, got {value!r:.60}")
            elif key in ("age", "los"):
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
                    raise VisitInputError(f"visit {t} {key!r} must be a number or None, got {value!r:.60}")
            elif value not in (*GENDER_CODES, None):
                raise VisitInputError(f"visit {t} 'gender' must be {sorted(GENDER_CODES)} or None, got {value!r}")


class Recommender:
    """Wraps a trained MedRecModule to recommend drugs for one patient's visit history."""

    def __init__(self, model):
        self.model = model.eval()
        self.knowledge: CohortKnowledge = model.knowledge
        self._index = {name: {c: i for i, c in enumerate(codes)} for name, codes in self.knowledge.vocab.items()}

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> Recommender:
        return cls(load_model(path, map_location))

    def _encode(self, codes, vocab: str, visit: int, on_unknown: str) -> np.ndarray:
        index = self._index[vocab]
        unknown = [c for c in codes if c not in index]
        if unknown:
            message = (
                f"{vocab} code(s) {unknown} in visit {visit} are not in the model's vocabulary ({len(index)} codes)"
            )
            if on_unknown == "error":
                raise UnknownCodeError(f"{message}; pass on_unknown='ignore' to drop them")
            warnings.warn(f"{message}; ignored", stacklevel=3)
        return np.array(sorted({index[c] for c in codes if c in index}), dtype=np.int64)

    @torch.no_grad()
    def recommend(self, visits: list[dict], on_unknown: Literal["error", "ignore"] = "error") -> dict:
        """Recommend for the last visit of ``visits`` (earlier visits are history, with their drugs).

        Each visit is a dict with ``diagnoses``, ``procedures`` and, for earlier visits,
        ``medications`` (code strings); optional ``labs``, ``age``, ``los``, ``gender``.
        """
        if not visits:
            raise VisitInputError("recommend() needs at least one visit")
        check_visits(visits)
        if on_unknown not in ("error", "ignore"):
            raise ValueError(f"on_unknown must be 'error' or 'ignore', got {on_unknown!r}")
        sample = {"patient_index": 0, "visit_ids": list(range(len(visits)))}
        for column, vocab in (("diagnoses", "diagnosis"), ("procedures", "procedure"), ("labs", "lab")):
            sample[column] = [self._encode(v.get(column, []), vocab, t, on_unknown) for t, v in enumerate(visits)]
        sample["medications"] = [
            self._encode(v.get("medications", []), "medication", t, on_unknown) for t, v in enumerate(visits[:-1])
        ] + [np.zeros(0, np.int64)]
        for column in ("age", "los"):
            sample[column] = np.array([v.get(column, np.nan) for v in visits], dtype=np.float32)
        sample["gender"] = GENDER_CODES.get(visits[0].get("gender"), 0)
        batch = VisitCollator(self.knowledge.num_medications)([sample])
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        probs = self.model.predict_probabilities(batch)[0, len(visits) - 1].float().cpu()
        return visit_record(probs, self.model.threshold, self.knowledge)
