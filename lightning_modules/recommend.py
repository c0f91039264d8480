"""Recommendations out of a trained model: per-visit records and a small Python API.

from lightning_modules.recommend import Recommender
rec = Recommender.from_checkpoint("runs/.../best.ckpt")
rec.recommend([{"diagnoses": ["4019", "42731"], "procedures": ["3893"], "medications": ["B01A"]},
               {"diagnoses": ["4280"], "procedures": ["3893"]}], threshold=0.4, top_k=5)
# -> {"drugs": [...], "drug_names": [...], "probabilities": [...], "ddi_pairs": [[a, b], ...]}
rec.recommend_batch([history_1, history_2, ...])  # one forward pass, one record per history

A record lists the drugs whose probability is >= the threshold, best first, at most ``top_k`` of
them (all when None). Where the visit's recorded drugs are known (``train.py predict``; a last
visit given with ``medications``) it also has ``recorded_drugs``, ``recorded_drug_names`` and
``jaccard`` = |recommended ∩ recorded| / |recommended ∪ recorded| (0 when both are empty).
"""

from __future__ import annotations

import difflib
import importlib
import numbers
import sys
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from datamodules.cohort import CohortError
from datamodules.knowledge import CohortKnowledge
from datamodules.safe_pickle import load_checkpoint
from datamodules.visit_sequence import GENDER_CODES

MODEL_CLASS_KEY = "medrec_model_class"


class RecommendationOptionError(CohortError):
    """A recommendation option (threshold, top_k) is out of range (train.py prints it on one line)."""


def check_threshold(threshold: float, option: str = "threshold") -> float:
    """``threshold`` if it lies in (0, 1]; else an error naming ``option``."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold <= 1.0:
        raise RecommendationOptionError(f"{option} must lie in (0, 1], got {threshold!r}")
    return float(threshold)


def check_top_k(top_k: int | None, option: str = "top_k") -> int | None:
    """``top_k`` if it is None or an integer >= 1; else an error naming ``option``."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise RecommendationOptionError(f"{option} must be an integer >= 1 (or unset for all), got {top_k!r}")
    return None if top_k is None else int(top_k)


def jaccard(recommended: Sequence[str], recorded: Sequence[str]) -> float:
    """Jaccard similarity of two drug sets; 0 when both are empty (the SafeDrug convention)."""
    a, b = set(recommended), set(recorded)
    return round(len(a & b) / len(a | b), 4) if a | b else 0.0


def limit_record(record: dict, top_k: int | None) -> dict:
    """The record cut to its ``top_k`` most probable drugs (records list drugs best first): DDI
    pairs with a dropped drug go, the Jaccard is recomputed; other fields are kept as they are."""
    if top_k is None or len(record["drugs"]) <= top_k:
        return record
    out = dict(record)
    for key in ("drugs", "drug_names", "probabilities"):
        out[key] = record[key][:top_k]
    kept = set(out["drugs"])
    out["ddi_pairs"] = [pair for pair in record["ddi_pairs"] if pair[0] in kept and pair[1] in kept]
    if "recorded_drugs" in record:
        out["jaccard"] = jaccard(out["drugs"], record["recorded_drugs"])
    return out


def visit_record(
    probs: torch.Tensor,
    threshold: float,
    knowledge: CohortKnowledge,
    top_k: int | None = None,
    recorded: Sequence[int] | None = None,
) -> dict:
    """Recommended drugs of one visit (probability >= threshold, the ``top_k`` most probable of
    those), best first, with DDI pairs flagged; ``recorded``: indices of the drugs the visit
    actually got, which add ``recorded_drugs``, ``recorded_drug_names`` and ``jaccard``."""
    chosen = (probs >= threshold).nonzero().flatten()
    chosen = chosen[torch.argsort(probs[chosen], descending=True, stable=True)].tolist()
    codes = knowledge.vocab["medication"]
    names = knowledge.medication_names
    ddi = knowledge.ddi_adj
    record = {
        "drugs": [codes[d] for d in chosen],
        "drug_names": [names[d] for d in chosen] if names else [],
        "probabilities": [round(float(probs[d]), 4) for d in chosen],
        "ddi_pairs": [
            [codes[a], codes[b]] for i, a in enumerate(chosen) for b in chosen[i + 1 :] if ddi[a, b] or ddi[b, a]
        ],
    }
    if recorded is not None:
        recorded = sorted({int(d) for d in recorded})
        record["recorded_drugs"] = [codes[d] for d in recorded]
        record["recorded_drug_names"] = [names[d] for d in recorded] if names else []
        record["jaccard"] = jaccard(record["drugs"], record["recorded_drugs"])
    return limit_record(record, top_k)


def load_model(path: str, map_location: str | torch.device = "cpu", kind: type | None = None):
    """The model a medrec checkpoint holds, as the class it was trained as; ``kind``: the class it must be."""
    checkpoint = load_checkpoint(path, map_location=map_location)  # weights_only: no code runs
    class_path = checkpoint.get(MODEL_CLASS_KEY) if isinstance(checkpoint, dict) else None
    if class_path is None:
        raise CohortError(f"{path}: not a medrec checkpoint (no {MODEL_CLASS_KEY})")
    module, _, name = class_path.rpartition(".")
    if not ((module + ".").startswith("lightning_modules.") or module in sys.modules):  # an import could run code
        raise CohortError(f"{path}: names model class {class_path!r}, which is not a medrec model")
    model_class = getattr(importlib.import_module(module), name, None)
    from lightning_modules.base import MedRecModule  # here: base imports this module

    if not isinstance(model_class, type) or not issubclass(model_class, MedRecModule):
        raise CohortError(f"{path}: names model class {class_path!r}, which is not a medrec model")
    if kind is not None and not issubclass(model_class, kind):
        raise CohortError(f"{path}: a {name} checkpoint, where a {kind.__name__} checkpoint is needed")
    return model_class.from_checkpoint(path, map_location=map_location)


class UnknownCodeError(CohortError):
    """A code given to the recommender is outside the model's vocabulary."""


class VisitInputError(CohortError):
    """Visits given to ``Recommender.recommend`` that do not have the documented shape."""


VISIT_KEYS = {"diagnoses", "procedures", "medications", "labs", "age", "los", "gender"}


def check_visits(visits, where: str = "") -> None:
    """Raise VisitInputError naming the visit, the key and the rule of the first malformed part."""
    if not isinstance(visits, (list, tuple)):
        raise VisitInputError(f"visits{where} must be a list of visit dicts, got a {type(visits).__name__}")
    for i, visit in enumerate(visits):
        t = f"{i}{where}"
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
    """Wraps a trained MedRecModule to recommend drugs from patients' visit histories."""

    def __init__(self, model):
        self.model = model.eval()
        self.knowledge: CohortKnowledge = model.knowledge
        self._index = {name: {c: i for i, c in enumerate(codes)} for name, codes in self.knowledge.vocab.items()}

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu") -> Recommender:
        return cls(load_model(path, map_location))

    def _encode(self, codes, vocab: str, where: str, on_unknown: str) -> np.ndarray:
        index = self._index[vocab]
        unknown = [c for c in codes if c not in index]
        if unknown:
            message = f"{vocab} code(s) {unknown} in {where} are not in the model's vocabulary ({len(index)} codes)"
            if on_unknown == "error":
                raise UnknownCodeError(f"{message}; pass on_unknown='ignore' to drop them")
            warnings.warn(f"{message}; ignored", stacklevel=4)
        return np.array(sorted({index[c] for c in codes if c in index}), dtype=np.int64)

    def _sample(self, visits: list[dict], position: int, where: str, on_unknown: str) -> tuple[dict, list | None]:
        """One history as a dataset sample (the last visit's drugs left out: they are the target)
        and the last visit's recorded drug indices (None when it gives no ``medications``)."""
        if not visits:
            detail = f" per history; history {position} has none" if where else ""
            raise VisitInputError(f"recommend() needs at least one visit{detail}")
        check_visits(visits, where)
        sample = {"patient_index": position, "visit_ids": list(range(len(visits)))}
        for column, vocab in (("diagnoses", "diagnosis"), ("procedures", "procedure"), ("labs", "lab")):
            sample[column] = [
                self._encode(v.get(column, []), vocab, f"visit {t}{where}", on_unknown) for t, v in enumerate(visits)
            ]
        sample["medications"] = [
            self._encode(v.get("medications", []), "medication", f"visit {t}{where}", on_unknown)
            for t, v in enumerate(visits[:-1])
        ] + [np.zeros(0, np.int64)]
        for column in ("age", "los"):
            sample[column] = np.array([v.get(column, np.nan) for v in visits], dtype=np.float32)
        sample["gender"] = GENDER_CODES.get(visits[0].get("gender"), 0)
        last = visits[-1].get("medications")
        where_last = f"visit {len(visits) - 1}{where}"
        recorded = None if last is None else self._encode(last, "medication", where_last, on_unknown).tolist()
        return sample, recorded

    @torch.no_grad()
    def recommend_batch(
        self,
        histories: list[list[dict]],
        threshold: float | None = None,
        top_k: int | None = None,
        on_unknown: Literal["error", "ignore"] = "error",
    ) -> list[dict]:
        """``recommend`` for many patients in one forward pass: the histories are padded into one
        batch in the model's layout (``MedRecModule.collate_histories``); one record per history, in order."""
        threshold = check_threshold(self.model.threshold if threshold is None else threshold)
        top_k = check_top_k(top_k)
        if on_unknown not in ("error", "ignore"):
            raise ValueError(f"on_unknown must be 'error' or 'ignore', got {on_unknown!r}")
        if not histories:
            return []
        single = len(histories) == 1
        prepared = [
            self._sample(visits, i, "" if single else f" of history {i}", on_unknown)
            for i, visits in enumerate(histories)
        ]
        batch = self.model.collate_histories([sample for sample, _ in prepared])
        batch = move_data_to_device(batch, self.model.device)
        probs = self.model.predict_probabilities(batch).float().cpu()
        last = batch["lengths"].cpu() - 1
        return [
            visit_record(probs[i, last[i]], threshold, self.knowledge, top_k, recorded)
            for i, (_, recorded) in enumerate(prepared)
        ]

    def recommend(
        self,
        visits: list[dict],
        threshold: float | None = None,
        top_k: int | None = None,
        on_unknown: Literal["error", "ignore"] = "error",
    ) -> dict:
        """Recommend for the last visit of ``visits`` (earlier visits are history, with their drugs).

        Each visit is a dict with ``diagnoses``, ``procedures`` and, for earlier visits,
        ``medications`` (code strings); optional ``labs``, ``age``, ``los``, ``gender``. The last
        visit's ``medications``, if given, are not shown to the model: they are the recorded drugs
        the record compares with. ``threshold`` (in (0, 1]; default: the model's) and ``top_k``
        (at most that many drugs, the most probable; default: all over the threshold).
        """
        return self.recommend_batch([visits], threshold, top_k, on_unknown)[0]
