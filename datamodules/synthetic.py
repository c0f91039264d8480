"""Deterministic synthetic cohort: the embedded default when no data folder is given.

Drugs are real ATC3 classes with real molecules (``resources/atc3_molecules.csv``); clinical
conditions (``resources/conditions.json``) tie real ICD-9 diagnosis/procedure codes and
abnormal labs to the drug classes that treat them; class-level interactions
(``resources/atc3_relations.csv``) give the adverse DDI pairs and synergy labels.

The generative story, chosen so that a good model has something to learn beyond drug
frequency:

* each patient has chronic conditions (active at every visit, more likely with age) and each
  visit adds acute ones; active conditions emit their diagnosis, procedure and lab codes
  noisily, mixed with incidental codes;
* every condition's indicated drugs are prescribed with high probability, a drug given at
  the previous visit is more likely to be continued (history matters), a few ward-routine
  drugs are given to most patients (what a frequency baseline captures), plus random noise;
* a careful prescriber swaps a drug for its alternative when it would interact with one
  already chosen, but not always — so adverse pairs do occur in the prescriptions;
* length of stay grows with the severity of the conditions and with an inappropriate
  prescription (indicated drugs missing, adverse pairs present), which MiranDa needs.

``regimens > 0`` switches prescribing to a catalogue of standard drug packages (hospital order
sets), the premise of drug *package* recommendation (DPR): the world draws that many regimens,
each covering a few conditions (their indicated drugs with the safe substitutes, plus a ward
routine), and every visit receives the regimen whose conditions best match its own (Jaccard
over conditions). Packages then recur across patients; everything else is unchanged.

``vulnerable_age > 0`` makes interactions matter per patient (DPR's personalised interactions):
patients of that age or older are spared interacting pairs — the cautious regimen (safe
substitutes, then one drug of every remaining interacting pair left out), or drug by drug the
safe substitutes — while younger patients receive the first-line drugs, interacting pairs
included. Age is in every visit's record, so the rule is learnable from the data.

``extra_ddi_pairs > 0`` adds that many antagonistic pairs among the indicated drugs (synthetic
knowledge, labelled in the relation table and the DDI graph like the real ones): many interacting
pairs, each in few packages, so that knowing which pairs interact cannot be replaced by having
seen each pair often.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from datamodules.cache import cache_name, cached_cohort
from datamodules.cohort import Cohort, CohortError

GENERATOR_VERSION = 1


# Options added after cohorts were first cached: left out of the cache key while off, so those caches stay valid.
KEYLESS_WHEN_OFF = ("regimens", "vulnerable_age", "extra_ddi_pairs")


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and noise knobs of the synthetic cohort; every field takes part in the cache key
    (those in ``KEYLESS_WHEN_OFF`` only when set)."""

    patients: int = 2000
    seed: int = 0
    mean_visits: float = 2.5
    max_visits: int = 8
    code_emission: float = 0.7
    incidental_diagnoses: float = 1.5
    prescribe_indicated: float = 0.85
    continue_previous: float = 0.5
    noise_drugs: float = 1.0
    safe_substitution: float = 0.7
    unknown_relations: int = 30
    regimens: int = 0
    vulnerable_age: float = 0.0
    extra_ddi_pairs: int = 0

    def __post_init__(self) -> None:
        if self.patients < 1:
            raise ValueError(f"synthetic cohort needs at least 1 patient, got {self.patients}")
        if self.max_visits < 1 or self.mean_visits < 1:
            raise ValueError("synthetic cohort needs mean_visits >= 1 and max_visits >= 1")
        if self.regimens < 0:
            raise ValueError(f"regimens must be >= 0 (0 prescribes drug by drug), got {self.regimens}")
        if self.vulnerable_age < 0:
            raise ValueError(
                f"vulnerable_age must be >= 0 (0: every patient is treated alike), got {self.vulnerable_age}"
            )
        if self.extra_ddi_pairs < 0:
            raise ValueError(f"extra_ddi_pairs must be >= 0, got {self.extra_ddi_pairs}")

    def cache_key(self) -> str:
        fields = asdict(self)
        for f in dataclasses.fields(self):  # 60 and 60.0 are the same spec: one key
            if f.type in (float, "float"):
                fields[f.name] = float(fields[f.name])
        for name in KEYLESS_WHEN_OFF:
            if not fields[name]:
                del fields[name]
        return cache_name(f"synthetic-{self.patients}p-seed{self.seed}", {"v": GENERATOR_VERSION, **fields})


# Routine ICU medications given to most admissions regardless of diagnosis (PPI, electrolytes,
# laxatives, paracetamol, IV solutions): the signal a frequency baseline can capture.
ROUTINE_DRUGS = {"A02B": 0.6, "A06A": 0.55, "N02B": 0.6, "B05C": 0.7, "A12C": 0.45}


def _resource(name: str):
    return resources.files("datamodules.resources").joinpath(name)


def load_molecule_table() -> pd.DataFrame:
    """ATC3 code, class name, drug name, SMILES (one row per molecule)."""
    with _resource("atc3_molecules.csv").open() as fh:
        return pd.read_csv(fh, dtype=str)


def load_relation_table() -> pd.DataFrame:
    with _resource("atc3_relations.csv").open() as fh:
        return pd.read_csv(fh, dtype=str)


def load_conditions() -> list[dict]:
    with _resource("conditions.json").open() as fh:
        return json.load(fh)


class _World:
    """The fixed knowledge the sampler draws from, indexed for speed."""

    def __init__(self, rng: np.random.Generator, spec: SyntheticSpec):
        molecules = load_molecule_table()
        self.drugs = list(dict.fromkeys(molecules["atc3"]))
        self.drug_names = molecules.drop_duplicates("atc3").set_index("atc3")["class_name"].reindex(self.drugs).tolist()
        self.smiles = molecules.groupby("atc3", sort=False)["smiles"].apply(list).to_dict()
        self.drug_index = {d: i for i, d in enumerate(self.drugs)}
        self.conditions = [c for c in load_conditions() if all(d in self.drug_index for d in c["drugs"])]
        if not self.conditions:
            raise CohortError("synthetic generator: no condition has all its drugs in the molecule table")
        self.diagnoses = sorted({code for c in self.conditions for code in c["diagnoses"]})
        self.procedures = sorted({code for c in self.conditions for code in c.get("procedures", [])})
        self.labs = sorted({code for c in self.conditions for code in c.get("labs", [])})
        self.routine = {self.drug_index[d]: p for d, p in ROUTINE_DRUGS.items() if d in self.drug_index}

        relations = load_relation_table()
        relations = relations[relations["drug_a"].isin(self.drug_index) & relations["drug_b"].isin(self.drug_index)]
        self.relations = relations[["drug_a", "drug_b", "relation", "direction"]].reset_index(drop=True)
        adverse = relations[relations["relation"] == "antagonism"]
        self.ddi_pairs = list(zip(adverse["drug_a"], adverse["drug_b"]))
        self.interacts = np.zeros((len(self.drugs), len(self.drugs)), dtype=bool)
        for a, b in self.ddi_pairs:
            self.interacts[self.drug_index[a], self.drug_index[b]] = True
            self.interacts[self.drug_index[b], self.drug_index[a]] = True
        self._add_unknown_relations(rng, spec.unknown_relations)
        if spec.extra_ddi_pairs:  # its own stream, so the rest of the world is drawn as without it
            self._add_adverse_pairs(np.random.default_rng([spec.seed, 2]), spec.extra_ddi_pairs)

        prevalence = np.array([c.get("prevalence", 1.0) for c in self.conditions], dtype=float)
        chronic = np.array([bool(c.get("chronic", False)) for c in self.conditions])
        self.chronic_ids = np.flatnonzero(chronic)
        self.acute_ids = np.flatnonzero(~chronic) if (~chronic).any() else np.arange(len(chronic))
        self.chronic_p = (
            prevalence[self.chronic_ids] / prevalence[self.chronic_ids].sum() if len(self.chronic_ids) else None
        )
        self.acute_p = prevalence[self.acute_ids] / prevalence[self.acute_ids].sum()

    def _add_unknown_relations(self, rng: np.random.Generator, count: int) -> None:
        labelled = {frozenset(p) for p in zip(self.relations["drug_a"], self.relations["drug_b"])}
        unknown = []
        while len(unknown) < count and len(labelled) < len(self.drugs) * (len(self.drugs) - 1) // 2:
            a, b = rng.choice(len(self.drugs), size=2, replace=False)
            pair = frozenset((self.drugs[a], self.drugs[b]))
            if pair not in labelled:
                labelled.add(pair)
                unknown.append((self.drugs[a], self.drugs[b], "unknown", "both"))
        extra = pd.DataFrame(unknown, columns=["drug_a", "drug_b", "relation", "direction"])
        self.relations = pd.concat([self.relations, extra], ignore_index=True)

    def _add_adverse_pairs(self, rng: np.random.Generator, count: int) -> None:
        """``count`` more antagonistic pairs among the conditions' indicated drugs, none of them
        already labelled: a denser interaction world with many pairs, each prescribed rarely."""
        indicated = sorted({code for c in self.conditions for code in c["drugs"]})
        labelled = {frozenset(p) for p in zip(self.relations["drug_a"], self.relations["drug_b"])}
        free = [
            (a, b) for i, a in enumerate(indicated) for b in indicated[i + 1 :] if frozenset((a, b)) not in labelled
        ]
        if count > len(free):
            raise ValueError(f"extra_ddi_pairs={count}, but only {len(free)} unlabelled pairs of indicated drugs exist")
        added = [free[i] for i in np.sort(rng.choice(len(free), size=count, replace=False))]
        for a, b in added:
            self.interacts[self.drug_index[a], self.drug_index[b]] = True
            self.interacts[self.drug_index[b], self.drug_index[a]] = True
        self.ddi_pairs += added
        extra = pd.DataFrame([(a, b, "antagonism", "both") for a, b in added], columns=self.relations.columns)
        self.relations = pd.concat([self.relations, extra], ignore_index=True)


class RegimenCatalogue:
    """Standard drug packages (order sets) a regimen-based prescriber chooses from.

    Regimen r covers the conditions ``conditions[r]`` (one acute, up to two chronic, drawn by
    prevalence); its safe package is their indicated drugs, each swapped for its alternative when
    it would interact with a drug already in the package, plus ward-routine drugs drawn once. Two
    more versions serve ``vulnerable_age``: first-line (the indicated drugs, interacting pairs
    included) and cautious (the safe package with one drug of every remaining interacting pair
    dropped, see ``without_interactions``).
    """

    def __init__(self, rng: np.random.Generator, world: _World, count: int):
        n_conditions, n_drugs = len(world.conditions), len(world.drugs)
        packages, first_line, covered, seen = [], [], [], set()
        for _ in range(count):
            chosen = [int(rng.choice(world.acute_ids, p=world.acute_p))]
            n_chronic = min(int(rng.binomial(2, 0.4)), len(world.chronic_ids))
            if n_chronic:
                chosen += [
                    int(c) for c in rng.choice(world.chronic_ids, size=n_chronic, replace=False, p=world.chronic_p)
                ]
            given = np.zeros(n_drugs, dtype=bool)
            first = np.zeros(n_drugs, dtype=bool)
            for cid in chosen:
                cond = world.conditions[cid]
                for code in cond["drugs"]:
                    d = first_d = world.drug_index[code]
                    alt = cond.get("alternatives", {}).get(code)
                    if alt in world.drug_index and (world.interacts[d] & given).any():
                        d = world.drug_index[alt]
                    given[d] = True
                    first[first_d] = True
            for d, p_routine in world.routine.items():
                routine = rng.random() < p_routine
                given[d] |= routine
                first[d] |= routine
            key = (frozenset(chosen), given.tobytes())
            if key in seen:
                continue
            seen.add(key)
            mask = np.zeros(n_conditions, dtype=bool)
            mask[chosen] = True
            packages.append(given)
            first_line.append(first)
            covered.append(mask)
        self.packages = np.stack(packages)
        self.first_line = np.stack(first_line)
        self.cautious = np.stack([without_interactions(p, world.interacts, set(world.routine)) for p in packages])
        self.conditions = np.stack(covered)

    def choose(self, active: list[int], version: Literal["safe", "first_line", "cautious"] = "safe") -> np.ndarray:
        """A version of the package of the regimen whose conditions best match ``active`` (Jaccard;
        first on ties): ``safe`` (substitutes), ``first_line`` (interacting pairs kept) or
        ``cautious`` (substitutes, then no interacting pair left)."""
        mask = np.zeros(self.conditions.shape[1], dtype=bool)
        mask[active] = True
        inter = (self.conditions & mask).sum(1)
        union = (self.conditions | mask).sum(1)
        return getattr(self, "packages" if version == "safe" else version)[int(np.argmax(inter / union))].copy()


def without_interactions(package: np.ndarray, interacts: np.ndarray, routine: set[int]) -> np.ndarray:
    """``package`` (M,) bool with one drug of every interacting pair dropped: the ward-routine drug
    if only one of the two is routine, else the one with the higher index (pairs in index order)."""
    package = package.copy()
    while True:
        pairs = np.argwhere(np.triu(interacts & package[:, None] & package[None, :]))
        if not len(pairs):
            return package
        a, b = (int(d) for d in pairs[0])
        package[a if a in routine and b not in routine else b] = False


def _emit(rng: np.random.Generator, codes: list[str], p: float) -> list[str]:
    """Each code with probability p, but at least one so an active condition leaves a trace."""
    if not codes:
        return []
    keep = [c for c in codes if rng.random() < p]
    return keep or [codes[rng.integers(len(codes))]]


def _prescribe_drug_by_drug(
    rng: np.random.Generator,
    world: _World,
    spec: SyntheticSpec,
    active: list[int],
    previous: np.ndarray,
    cautious: bool = True,
) -> np.ndarray:
    """Indicated drugs (continued ones likelier), safe substitutes (only if ``cautious``), carry-over,
    routine and noise drugs."""
    n_drugs = len(world.drugs)
    given = np.zeros(n_drugs, dtype=bool)
    for cid in active:
        cond = world.conditions[cid]
        for code in cond["drugs"]:
            d = world.drug_index[code]
            p_give = spec.prescribe_indicated + (1 - spec.prescribe_indicated) * 0.7 * previous[d]
            if rng.random() >= p_give:
                continue
            alt = cond.get("alternatives", {}).get(code)
            if (
                cautious
                and alt in world.drug_index
                and (world.interacts[d] & given).any()
                and rng.random() < spec.safe_substitution
            ):
                d = world.drug_index[alt]
            given[d] = True
    carried = previous & ~given & (rng.random(n_drugs) < spec.continue_previous * 0.5)
    given |= carried
    for d, p_routine in world.routine.items():
        given[d] |= rng.random() < p_routine
    given[rng.integers(n_drugs, size=rng.poisson(spec.noise_drugs))] = True
    if not given.any():
        given[next(iter(world.routine), 0)] = True
    return given


def generate_synthetic_cohort(spec: SyntheticSpec = SyntheticSpec()) -> Cohort:
    """Sample a cohort; the same spec always gives the same cohort."""
    rng = np.random.default_rng(spec.seed)
    world = _World(rng, spec)
    catalogue = RegimenCatalogue(np.random.default_rng([spec.seed, 1]), world, spec.regimens) if spec.regimens else None
    diag_index = {c: i for i, c in enumerate(world.diagnoses)}
    proc_index = {c: i for i, c in enumerate(world.procedures)}
    lab_index = {c: i for i, c in enumerate(world.labs)}
    n_drugs = len(world.drugs)
    rows = []
    width = len(str(spec.patients))
    start = np.datetime64("2101-01-01T00:00")
    for p in range(spec.patients):
        pid = f"S{p:0{width}d}"
        age0 = float(rng.uniform(18, 90))
        gender = "F" if rng.random() < 0.5 else "M"
        n_chronic = min(rng.binomial(3, 0.15 + 0.5 * (age0 - 18) / 72), len(world.chronic_ids))
        chronic = (
            list(rng.choice(world.chronic_ids, size=n_chronic, replace=False, p=world.chronic_p)) if n_chronic else []
        )
        n_visits = int(min(rng.geometric(1.0 / spec.mean_visits), spec.max_visits))
        time = first_time = start + np.timedelta64(int(rng.integers(0, 365 * 24 * 60)), "m")
        previous = np.zeros(n_drugs, dtype=bool)
        for t in range(n_visits):
            n_acute = 1 + rng.binomial(1, 0.4)
            acute = list(rng.choice(world.acute_ids, size=n_acute, replace=False, p=world.acute_p))
            active = list(dict.fromkeys(chronic + acute))
            if t > 0 and rng.random() < 0.25:
                chronic = list(dict.fromkeys(chronic + [acute[0]]))  # an acute problem can persist

            diags, procs, labs = [], [], []
            for cid in active:
                cond = world.conditions[cid]
                diags += _emit(rng, cond["diagnoses"], spec.code_emission)
                if cond.get("procedures") and rng.random() < 0.8:
                    procs += _emit(rng, cond["procedures"], spec.code_emission)
                if cond.get("labs"):
                    labs += [lab for lab in cond["labs"] if rng.random() < spec.code_emission]
            diags += list(rng.choice(world.diagnoses, size=rng.poisson(spec.incidental_diagnoses)))
            if not procs or rng.random() < 0.3:
                procs += list(rng.choice(world.procedures, size=1))

            indicated = np.zeros(n_drugs, dtype=bool)
            for cid in active:
                indicated[[world.drug_index[code] for code in world.conditions[cid]["drugs"]]] = True
            age = age0 + (time - first_time).astype("timedelta64[D]").astype(float) / 365.25
            cautious = not spec.vulnerable_age or round(age, 1) >= spec.vulnerable_age  # the recorded age
            if catalogue is not None:
                version = "safe" if not spec.vulnerable_age else "cautious" if cautious else "first_line"
                given = catalogue.choose(active, version)
            else:
                given = _prescribe_drug_by_drug(rng, world, spec, active, previous, cautious)
            base = sorted((world.conditions[c].get("base_los_days", 3.0) for c in active), reverse=True)
            severity = base[0] + 0.3 * sum(base[1:])
            missed = int((indicated & ~given).sum())
            adverse = int((world.interacts[np.ix_(given, given)]).sum() // 2)
            los = severity * rng.gamma(6.0, 1.0 / 6.0) * (1 + 0.004 * max(age - 50, 0))
            los += 1.5 * missed + 1.0 * adverse

            rows.append(
                {
                    "patient_id": pid,
                    "visit_id": f"{pid}-{t}",
                    "visit_order": t,
                    "time": time,
                    "diagnoses": sorted({diag_index[c] for c in diags}),
                    "procedures": sorted({proc_index[c] for c in procs}),
                    "medications": np.flatnonzero(given).tolist(),
                    "labs": sorted({lab_index[c] for c in labs}),
                    "age": round(age, 1),
                    "gender": gender,
                    "los": round(float(los), 2),
                }
            )
            previous = given
            time = time + np.timedelta64(int(los * 24 * 60), "m") + np.timedelta64(int(rng.integers(7, 400)), "D")
    cohort = Cohort(
        visits=pd.DataFrame(rows),
        vocab={
            "diagnosis": world.diagnoses,
            "procedure": world.procedures,
            "medication": world.drugs,
            "lab": world.labs,
        },
        ddi_pairs=world.ddi_pairs,
        smiles=world.smiles,
        relations=world.relations,
        medication_names=world.drug_names,
        source=f"synthetic:{spec.cache_key()}",
    )
    return cohort.validate(where="synthetic cohort")


def synthetic_cohort(spec: SyntheticSpec, cache_dir: str | Path) -> Cohort:
    """Load the cached cohort for ``spec``, generating and saving it on first use."""
    return cached_cohort(Path(cache_dir) / spec.cache_key(), lambda: generate_synthetic_cohort(spec))
