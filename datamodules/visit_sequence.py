"""Visit-sequence DataModule: one sample = one patient's whole visit sequence.

Models predict the drug set of every visit t at once from diagnoses/procedures of visits <= t
and drugs of visits < t (causality is the model's job; the batch carries the full sequence).
A batch is a dict of padded tensors, one row per patient: ``datamodules.batches.VisitBatch``
(each key's dtype, shape and meaning there; tests/test_batches.py holds the collator to it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.batches import VisitBatch
from datamodules.cohort import CODE_COLUMNS, Cohort, CohortError
from datamodules.errors import OptionError
from datamodules.knowledge import CohortKnowledge, TrainingStays, co_prescription_adjacency, prevalence
from datamodules.options import ClosedUnitInterval, NonNegativeInt, PositiveInt, plain
from datamodules.sources import Source, resolve_cohort
from datamodules.synthetic import SyntheticSpec

log = logging.getLogger(__name__)

SEQUENCE_COLUMNS = ("diagnoses", "procedures", "labs")
GENDER_CODES = {"F": 1, "M": 2}


class PatientSequences(Dataset):
    """Patients of one split, each as arrays per visit (prepared once, collated per batch)."""

    def __init__(self, cohort: Cohort, patient_ids: list[str], max_visits: int | None = None):
        self.patient_ids = list(patient_ids)
        wanted = cohort.visits[cohort.visits["patient_id"].isin(set(self.patient_ids))]
        groups = {pid: frame for pid, frame in wanted.groupby("patient_id", sort=False)}
        self.samples = []
        for i, pid in enumerate(self.patient_ids):
            frame = groups[pid]
            if max_visits is not None:
                frame = frame.iloc[-max_visits:]
            sample = {"patient_index": i, "patient_id": pid, "visit_ids": frame["visit_id"].tolist()}
            for col in ("diagnoses", "procedures", "medications", "labs"):
                sample[col] = (
                    [np.asarray(v, dtype=np.int64) for v in frame[col]]
                    if col in frame.columns
                    else [np.zeros(0, np.int64)] * len(frame)
                )
            for col in ("age", "los"):
                sample[col] = (
                    frame[col].to_numpy(dtype=np.float32, na_value=np.nan)
                    if col in frame.columns
                    else np.full(len(frame), np.nan, np.float32)
                )
            gender = frame["gender"].iloc[0] if "gender" in frame.columns else None
            sample["gender"] = GENDER_CODES.get(gender, 0)
            self.samples.append(sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


class EpochShuffleSampler(Sampler[int]):
    """Shuffles patients with a permutation fixed by (seed, epoch).

    Lightning calls ``set_epoch`` at every epoch start, so a run resumed from a checkpoint sees
    exactly the batches an uninterrupted run would have seen. Under DDP Lightning swaps in its
    DistributedSampler, which is seeded the same way.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class VisitCollator:
    """Pads a list of patients into the batch dict documented in this module."""

    def __init__(self, num_medications: int):
        self.num_medications = num_medications

    def __call__(self, samples: list[dict]) -> VisitBatch:
        lengths = np.array([len(s["medications"]) for s in samples])
        batch_size, max_t = len(samples), int(lengths.max())
        batch = {}
        for col in SEQUENCE_COLUMNS:
            width = max(1, max((len(v) for s in samples for v in s[col]), default=1))
            codes = np.zeros((batch_size, max_t, width), np.int64)
            mask = np.zeros((batch_size, max_t, width), bool)
            for b, s in enumerate(samples):
                for t, v in enumerate(s[col]):
                    codes[b, t, : len(v)] = v
                    mask[b, t, : len(v)] = True
            batch[col] = torch.from_numpy(codes)
            batch[f"{col}_mask"] = torch.from_numpy(mask)
        meds = np.zeros((batch_size, max_t, self.num_medications), np.float32)
        for b, s in enumerate(samples):
            rows = np.repeat(np.arange(len(s["medications"])), [len(v) for v in s["medications"]])
            if len(rows):
                meds[b, rows, np.concatenate(s["medications"])] = 1.0
        batch["medications"] = torch.from_numpy(meds)
        batch["visit_mask"] = torch.arange(max_t)[None, :] < torch.from_numpy(lengths)[:, None]
        batch["lengths"] = torch.from_numpy(lengths)
        for col in ("age", "los"):
            values = np.full((batch_size, max_t), np.nan, np.float32)
            for b, s in enumerate(samples):
                values[b, : len(s[col])] = s[col]
            batch[col] = torch.from_numpy(values)
        batch["gender"] = torch.tensor([s["gender"] for s in samples])
        batch["patient_index"] = torch.tensor([s["patient_index"] for s in samples])
        # ids as given (strings): Lightning moves tensors only, so they stay on the host
        batch["patient_ids"] = [s.get("patient_id", s["patient_index"]) for s in samples]
        batch["visit_ids"] = [list(s.get("visit_ids", range(len(s["medications"])))) for s in samples]
        return batch


def synthetic_spec(patients: int, seed: int, options: dict) -> SyntheticSpec:
    """The synthetic cohort's spec from the DataModule options; a bad option name or value raises."""
    fields = {f.name: f.type for f in dataclasses.fields(SyntheticSpec) if f.name not in ("patients", "seed")}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise OptionError(f"unknown synthetic_options {unknown}; known: {sorted(fields)}")
    values = {}
    for name, value in options.items():
        # YAML and the CLI may give 150 as 150.0; integer fields must stay integers (cache key)
        if fields[name] in (int, "int"):
            if not float(value).is_integer():
                raise OptionError(f"synthetic_options.{name} must be an integer, got {value}")
            value = int(value)
        values[name] = float(value) if fields[name] in (float, "float") else value
    return SyntheticSpec(patients=patients, seed=seed, **values)


def raw_mimic_options(mappings: str | None):
    """ETL options of a raw MIMIC root read through this DataModule: the reference processing,
    mapping files from ``mappings``, and error messages that name ``--data.init_args.*``."""
    from datamodules.mimic.etl import EtlOptions

    return EtlOptions(mappings=mappings, options_from="train")


class VisitSequenceDataModule(L.LightningDataModule):
    """Loads a cohort (or the synthetic default), splits patients and batches visit sequences.

    Args:
        root: folder with a cohort, the SafeDrug benchmark pickles or raw MIMIC tables;
            ``None`` uses the deterministic synthetic cohort (generated once, then cached).
        source: what ``root`` holds; ``auto`` detects it.
        split: ``safedrug`` = the reference order split (first int(n*2/3) patients train, then
            half of the rest test, the remainder validation); ``random`` = seeded shuffle
            with ``split_ratios`` (train, validation, test).
        min_visits: drop patients with fewer visits (the benchmark already keeps >= 2).
        max_visits: keep only each patient's last N visits (None keeps all).
        synthetic_patients, synthetic_seed: size and seed of the synthetic default.
        synthetic_options: other ``datamodules.synthetic.SyntheticSpec`` fields, e.g.
            ``{regimens: 150}`` (prescriptions from a catalogue of standard packages) or
            ``{regimens: 150, vulnerable_age: 60}`` (interactions avoided only for patients aged 60+);
            ``extra_ddi_pairs: 150`` adds that many synthetic antagonistic pairs.
        cache_dir: where generated/imported cohorts go (default $MEDREC_CACHE or ~/.cache/medrec).
        mappings: raw MIMIC only: folder with the drug-mapping and knowledge files under their
            public names (README "Where each file comes from"); default: $MEDREC_MAPPINGS, then
            the MIMIC folder and its ``mappings/`` sub-folder.
    """

    def __init__(
        self,
        root: str | None = None,
        source: Source = "auto",
        split: Literal["safedrug", "random"] = "safedrug",
        split_ratios: tuple[ClosedUnitInterval, ClosedUnitInterval, ClosedUnitInterval] = (0.8, 0.1, 0.1),
        seed: int = 0,
        batch_size: PositiveInt = 32,
        eval_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 0,
        pin_memory: bool | None = None,
        min_visits: PositiveInt = 1,
        max_visits: PositiveInt | None = None,
        synthetic_patients: PositiveInt = 2000,
        synthetic_seed: int = 0,
        synthetic_options: dict[str, int | float] | None = None,
        cache_dir: str | None = None,
        mappings: str | None = None,
    ):
        super().__init__()
        split_ratios = tuple(plain(split_ratios))
        if len(split_ratios) != 3 or min(split_ratios) < 0 or not np.isclose(sum(split_ratios), 1.0):
            raise OptionError(
                f"split_ratios must be three non-negative numbers summing to 1, got {list(split_ratios)}"
                f" (sum {sum(split_ratios):g})"
            )
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise OptionError(f"{name} must be >= 1, got {value}")
        for name, value in (("min_visits", min_visits), ("max_visits", max_visits)):
            if value is not None and value < 1:
                raise OptionError(f"{name} must be >= 1 (None keeps every visit), got {value}")
        self.save_hyperparameters()
        self.hparams.update(plain(dict(self.hparams)))  # parsed option types -> builtins (weights_only)
        self.root, self.source, self.split = root, source, split
        self.split_ratios, self.seed = tuple(split_ratios), seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.min_visits, self.max_visits = min_visits, max_visits
        self.synthetic = synthetic_spec(synthetic_patients, synthetic_seed, synthetic_options or {})
        self.cache_dir, self.mappings = cache_dir, mappings
        self._cohort: Cohort | None = None
        self._splits: dict[str, list[str]] | None = None
        self._knowledge: CohortKnowledge | None = None
        self._datasets: dict[str, PatientSequences] = {}

    # --- cohort, splits, knowledge (lazy: the CLI reads `knowledge` right after __init__) ----
    @property
    def cohort(self) -> Cohort:
        if self._cohort is None:
            etl = raw_mimic_options(self.mappings) if self.root is not None else None
            self._cohort = resolve_cohort(self.root, self.source, self.synthetic, self.cache_dir, etl=etl)
            empty = self._cohort.visits["medications"].map(len) == 0
            if empty.any():
                first = self._cohort.visits.loc[empty, "visit_id"].iloc[0]
                raise CohortError(
                    f"{self._cohort.source}: {int(empty.sum())} visit(s) have no medication codes "
                    f"(first: {first}); a recommendation target cannot be empty"
                )
        return self._cohort

    @property
    def splits(self) -> dict[str, list[str]]:
        if self._splits is None:
            self._splits = self._make_splits()
        return self._splits

    def _make_splits(self) -> dict[str, list[str]]:
        counts = self.cohort.visits.groupby("patient_id", sort=False).size()
        patients = [p for p, n in counts.items() if n >= self.min_visits]
        n = len(patients)
        if self.split == "safedrug":
            cut = int(n * 2 / 3)
            rest = patients[cut:]
            n_test = int(len(rest) / 2)
            splits = {"train": patients[:cut], "test": rest[:n_test], "val": rest[n_test:]}
        else:
            order = np.random.default_rng(self.seed).permutation(n)
            n_train = int(round(n * self.split_ratios[0]))
            n_val = int(round(n * self.split_ratios[1]))
            shuffled = [patients[i] for i in order]
            splits = {
                "train": shuffled[:n_train],
                "val": shuffled[n_train : n_train + n_val],
                "test": shuffled[n_train + n_val :],
            }
        for name, ids in splits.items():
            if not ids:
                raise CohortError(
                    f"split {name!r} is empty: {n} patient(s) with >= {self.min_visits} visit(s) in "
                    f"{self.cohort.source} are too few for the {self.split!r} split"
                )
        return splits

    @property
    def knowledge(self) -> CohortKnowledge:
        if self._knowledge is None:
            cohort = self.cohort
            train = cohort.visits[cohort.visits["patient_id"].isin(set(self.splits["train"]))]
            n_med = cohort.vocab_size("medication")
            sequences = self.dataset("train")  # the training visits models see (max_visits applied)
            has_stays = {"age", "los"} <= set(cohort.fields)
            self._knowledge = CohortKnowledge(
                vocab={name: list(cohort.vocab[name]) for name in CODE_COLUMNS},
                ddi_adj=cohort.ddi_adjacency(),
                ehr_adj=co_prescription_adjacency(list(train["medications"]), n_med),
                smiles=dict(cohort.smiles),
                relations=cohort.relation_matrix(),
                medication_names=cohort.medication_names,
                fields=frozenset(cohort.fields),
                source=cohort.source,
                drug_prevalence=prevalence([m for s in sequences.samples for m in s["medications"]], n_med),
                diagnosis_prevalence=prevalence(
                    [d for s in sequences.samples for d in s["diagnoses"]], cohort.vocab_size("diagnosis")
                ),
                training_stays=TrainingStays.from_sequences(sequences) if has_stays else None,
            )
        return self._knowledge

    # --- Lightning hooks ---------------------------------------------------------------
    def prepare_data(self) -> None:
        _ = self.cohort  # generate or import once, on the main process first

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for name in wanted.get(stage, ("train", "val", "test")):
            if name not in self._datasets:
                self._datasets[name] = PatientSequences(self.cohort, self.splits[name], self.max_visits)

    def dataset(self, name: str) -> PatientSequences:
        if name not in self._datasets:
            self._datasets[name] = PatientSequences(self.cohort, self.splits[name], self.max_visits)
        return self._datasets[name]

    def loader_pins_memory(self) -> bool:
        """``pin_memory``, or when unset (None) whether the trainer runs on a CUDA device: pinned
        batches are copied to the GPU asynchronously (Lightning moves them with non_blocking)."""
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(name)
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
        if name != "train" and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning's default evaluation sampler pads ranks with repeated patients, which
            # would count them twice in the metrics; this one gives each patient to one rank.
            world = torch.distributed.get_world_size()
            if world > 1:
                sampler = UnrepeatedDistributedSampler(
                    dataset, num_replicas=world, rank=torch.distributed.get_rank(), shuffle=False
                )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if name == "train" else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.loader_pins_memory(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self._collator(),
        )

    def _collator(self):
        """What turns a list of patients into a batch (subclasses with another batch layout override it)."""
        return VisitCollator(self.knowledge.num_medications)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
