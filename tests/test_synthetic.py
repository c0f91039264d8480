"""The synthetic default cohort: deterministic, cached, realistic knowledge, learnable structure."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem

from datamodules.cohort import Cohort
from datamodules.package_graph import PackageGraphDataModule
from datamodules.sources import resolve_cohort
from datamodules.synthetic import (
    RegimenCatalogue,
    SyntheticSpec,
    _World,
    generate_synthetic_cohort,
    synthetic_cohort,
    without_interactions,
)
from datamodules.visit_sequence import VisitSequenceDataModule, synthetic_spec


@pytest.fixture(scope="module")
def cohort():
    return generate_synthetic_cohort(SyntheticSpec(patients=400, seed=11))


def test_same_spec_same_cohort_other_seed_other_cohort(cohort):
    again = generate_synthetic_cohort(SyntheticSpec(patients=400, seed=11))
    assert again.visits.drop(columns=["time"]).equals(cohort.visits.drop(columns=["time"]))
    assert (again.visits["time"] == cohort.visits["time"]).all()
    other = generate_synthetic_cohort(SyntheticSpec(patients=400, seed=12))
    assert not other.visits["medications"].map(tuple).equals(cohort.visits["medications"].map(tuple))


def test_default_size_matches_the_documented_scale():
    cohort = generate_synthetic_cohort(SyntheticSpec())
    summary = cohort.summary()
    assert summary["patients"] == 2000
    assert 4500 <= summary["visits"] <= 5500
    assert 90 <= summary["medication_vocab"] <= 110
    assert summary["fields"] == ["age", "gender", "labs", "los", "time"]


def test_every_drug_is_a_real_atc3_class_with_a_parseable_molecule(cohort):
    for code in cohort.vocab["medication"]:
        assert len(code) == 4 and code[0].isalpha() and code[1:3].isdigit()
        assert cohort.smiles[code], code
        assert all(Chem.MolFromSmiles(s) is not None for s in cohort.smiles[code])
    assert cohort.medication_names is not None and len(cohort.medication_names) == len(cohort.vocab["medication"])


def test_adverse_pairs_occur_in_prescriptions_and_relations_have_all_labels(cohort):
    adj = cohort.ddi_adjacency()
    assert adj.sum() >= 2 * 40
    pairs_in_visits = sum(int(adj[np.ix_(m, m)].sum() // 2) for m in cohort.visits["medications"])
    assert pairs_in_visits > 0.2 * len(cohort.visits)
    assert set(cohort.relations["relation"]) == {"synergy", "antagonism", "unknown"}
    rel = cohort.relation_matrix()
    assert (rel == 1).any() and (rel == 2).any() and (rel == -1).any()


def test_length_of_stay_rewards_appropriate_prescriptions(cohort):
    adj = cohort.ddi_adjacency()
    adverse = np.array([adj[np.ix_(m, m)].sum() > 0 for m in cohort.visits["medications"]])
    los = cohort.visits["los"].to_numpy()
    assert (los > 0).all()
    assert los[adverse].mean() > los[~adverse].mean() + 1.0


def test_history_matters_drugs_repeat_across_visits(cohort):
    """A drug given at visit t-1 is far more likely at visit t than its base rate."""
    visits = cohort.visits
    repeat, base = [], []
    n_drugs = len(cohort.vocab["medication"])
    for _, frame in visits.groupby("patient_id"):
        meds = [set(m) for m in frame["medications"]]
        for prev, cur in zip(meds, meds[1:]):
            repeat.append(len(prev & cur) / max(len(prev), 1))
            base.append(len(cur) / n_drugs)
    assert np.mean(repeat) > 2 * np.mean(base)


def test_generated_once_then_loaded_from_cache(tmp_path):
    spec = SyntheticSpec(patients=30, seed=5)
    first = synthetic_cohort(spec, tmp_path)
    folder = tmp_path / spec.cache_key()
    stamp = (folder / "visits.parquet").stat().st_mtime_ns
    second = resolve_cohort(None, synthetic=spec, cache_dir=tmp_path)
    assert (folder / "visits.parquet").stat().st_mtime_ns == stamp
    assert second.visits["visit_id"].tolist() == first.visits["visit_id"].tolist()
    assert isinstance(Cohort.load(folder), Cohort)


def test_bad_spec_rejected():
    with pytest.raises(ValueError, match="at least 1 patient"):
        SyntheticSpec(patients=0)


# --- regimen prescribing (a catalogue of standard packages, DPR's premise) ---------------------


def test_default_cohort_keeps_its_cache_key_after_the_regimen_option():
    # the key of the default cohort as cached before `regimens` existed: caches stay valid
    assert SyntheticSpec().cache_key() == "synthetic-2000p-seed0-487eb9a6ae"
    assert SyntheticSpec(regimens=5).cache_key() != SyntheticSpec().cache_key()
    # ... and the regimen cohort its key after `vulnerable_age`
    assert SyntheticSpec(regimens=150).cache_key() == "synthetic-2000p-seed0-153f393d1f"
    vulnerable = SyntheticSpec(regimens=150, vulnerable_age=60).cache_key()
    assert vulnerable != SyntheticSpec(regimens=150).cache_key()
    assert vulnerable == SyntheticSpec(regimens=150, vulnerable_age=60.0).cache_key()  # YAML may say either


def test_default_cohorts_are_unchanged_by_the_generator_options():
    # fingerprints of the prescriptions as generated before `regimens` / `vulnerable_age` existed
    for spec, expected in [
        (SyntheticSpec(patients=300, seed=3), "765a64562f"),
        (SyntheticSpec(patients=300, seed=3, regimens=20), "97ff83cbe8"),
    ]:
        visits = generate_synthetic_cohort(spec).visits
        text = ";".join(",".join(map(str, m)) for m in visits["medications"]) + str(visits["los"].tolist())
        assert hashlib.sha1(text.encode()).hexdigest()[:10] == expected


def test_regimen_cohort_prescribes_catalogue_packages_that_recur():
    spec = SyntheticSpec(patients=300, seed=3, regimens=20)
    cohort = generate_synthetic_cohort(spec)
    catalogue = RegimenCatalogue(np.random.default_rng([3, 1]), _World(np.random.default_rng(3), spec), 20)
    offered = {tuple(np.flatnonzero(p)) for p in catalogue.packages}
    given = cohort.visits["medications"].map(tuple)
    assert set(given) <= offered and len(offered) <= 20
    assert given.value_counts().iloc[0] >= 10  # packages recur across patients
    # drug-by-drug prescribing gives the same patients nearly unique packages
    plain = generate_synthetic_cohort(SyntheticSpec(patients=300, seed=3)).visits["medications"].map(tuple)
    assert plain.nunique() > 0.9 * len(plain) and given.nunique() <= 20


def test_regimen_choice_is_the_best_condition_match_first_on_ties():
    catalogue = object.__new__(RegimenCatalogue)
    catalogue.conditions = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=bool)
    catalogue.packages = np.eye(4, dtype=bool)
    assert catalogue.choose([0, 1]).argmax() == 1  # Jaccard 1 beats 1/2; regimen 3 ties later
    assert catalogue.choose([0]).argmax() == 0
    assert catalogue.choose([2]).argmax() == 2  # 1/2 vs 0
    assert catalogue.choose([0, 2, 3]).argmax() == 2  # 2/3 vs 1/3 and 1/4
    chosen = catalogue.choose([0])
    chosen[:] = False
    assert catalogue.packages[0, 0]  # callers get a copy


def test_bad_synthetic_options_raise_a_clear_error():
    with pytest.raises(ValueError, match="unknown synthetic_options \\['regimen'\\]"):
        synthetic_spec(100, 0, {"regimen": 5})
    with pytest.raises(ValueError, match="regimens must be an integer"):
        synthetic_spec(100, 0, {"regimens": 1.5})
    with pytest.raises(ValueError, match="regimens must be >= 0"):
        SyntheticSpec(regimens=-1)
    with pytest.raises(ValueError, match="vulnerable_age must be >= 0"):
        synthetic_spec(100, 0, {"vulnerable_age": -5})
    assert synthetic_spec(100, 0, {"regimens": 7.0, "noise_drugs": 2}) == SyntheticSpec(
        patients=100, regimens=7, noise_drugs=2.0
    )


def test_datamodules_pass_synthetic_options_to_the_generator():
    options = {"regimens": 150}
    assert VisitSequenceDataModule(synthetic_options=options).synthetic == SyntheticSpec(regimens=150)
    assert PackageGraphDataModule(synthetic_options=options).synthetic == SyntheticSpec(regimens=150)


# --- personalised interactions (vulnerable_age) ------------------------------------------------


def test_without_interactions_drops_one_drug_of_every_interacting_pair():
    interacts = np.zeros((5, 5), dtype=bool)
    for a, b in [(0, 1), (1, 2), (3, 4)]:
        interacts[a, b] = interacts[b, a] = True
    package = np.ones(5, dtype=bool)
    # (0, 1): neither routine, the higher index goes; (3, 4): 3 is routine and 4 is not
    assert np.flatnonzero(without_interactions(package, interacts, {3})).tolist() == [0, 2, 4]
    # (0, 1): 1 is routine; then (1, 2) is gone with it
    assert np.flatnonzero(without_interactions(package, interacts, {1})).tolist() == [0, 2, 3]
    assert package.all()  # the input is left alone
    assert np.flatnonzero(without_interactions(np.eye(5, dtype=bool)[0], interacts, set())).tolist() == [0]


def test_vulnerable_patients_are_spared_interactions_younger_ones_get_first_line_regimens():
    spec = SyntheticSpec(patients=400, seed=3, regimens=30, vulnerable_age=60)
    visits = generate_synthetic_cohort(spec).visits
    world = _World(np.random.default_rng(3), spec)
    catalogue = RegimenCatalogue(np.random.default_rng([3, 1]), world, 30)
    adverse = visits["medications"].map(lambda m: int(world.interacts[np.ix_(m, m)].sum()))
    old = visits["age"] >= 60
    assert 0.2 < old.mean() < 0.7
    assert (adverse[old] == 0).all()
    assert (adverse[~old] > 0).mean() > 0.15  # the young keep interacting first-line pairs
    first_line = {tuple(np.flatnonzero(p)) for p in catalogue.first_line}
    cautious = {tuple(np.flatnonzero(p)) for p in catalogue.cautious}
    assert set(visits.loc[~old, "medications"].map(tuple)) <= first_line
    assert set(visits.loc[old, "medications"].map(tuple)) <= cautious
    # drug by drug, only the vulnerable get safe substitutes: more interacting pairs per visit among
    # the young than when everybody gets them (measured 1.22 -> 1.48), about as many among the old
    rates = []
    for age in (0, 60):
        plain = generate_synthetic_cohort(SyntheticSpec(patients=400, seed=3, vulnerable_age=age)).visits
        pairs = plain["medications"].map(lambda m: int(world.interacts[np.ix_(m, m)].sum()) // 2)
        rates.append((pairs[plain["age"] < 60].mean(), pairs[plain["age"] >= 60].mean()))
    (young_all, old_all), (young_vulnerable, old_vulnerable) = rates
    assert young_vulnerable > young_all + 0.15
    assert abs(old_vulnerable - old_all) < 0.15


# --- a denser interaction world (extra_ddi_pairs) -----------------------------------------------


def test_extra_ddi_pairs_are_new_antagonisms_among_indicated_drugs():
    base = generate_synthetic_cohort(SyntheticSpec(patients=50, seed=3))
    dense = generate_synthetic_cohort(SyntheticSpec(patients=50, seed=3, extra_ddi_pairs=40))
    world = _World(np.random.default_rng(3), SyntheticSpec(patients=50, seed=3))
    indicated = {code for c in world.conditions for code in c["drugs"]}
    # the real relations come first, unchanged; the new ones follow, all antagonisms of indicated drugs
    n = len(base.relations)
    pd.testing.assert_frame_equal(dense.relations.iloc[:n], base.relations)
    added = dense.relations.iloc[n:]
    assert len(added) == 40 and set(added["relation"]) == {"antagonism"} and set(added["direction"]) == {"both"}
    assert set(added["drug_a"]) | set(added["drug_b"]) <= indicated
    old_pairs = {frozenset(p) for p in zip(base.relations["drug_a"], base.relations["drug_b"])}
    new_pairs = {frozenset(p) for p in zip(added["drug_a"], added["drug_b"])}
    assert len(new_pairs) == 40 and not new_pairs & old_pairs
    assert {frozenset(p) for p in dense.ddi_pairs} == {frozenset(p) for p in base.ddi_pairs} | new_pairs

    # the new pairs act in the world: more prescriptions now hold an adverse pair
    def adverse(cohort):
        pairs = {frozenset(p) for p in cohort.ddi_pairs}
        drugs = cohort.vocab["medication"]
        return sum(
            any(frozenset((drugs[a], drugs[b])) in pairs for i, a in enumerate(m) for b in m[i + 1 :])
            for m in cohort.visits["medications"]
        )

    assert adverse(dense) > adverse(base)
    # the cache key of cohorts without the option is kept, and the option is validated
    assert SyntheticSpec(regimens=150, vulnerable_age=60, extra_ddi_pairs=0).cache_key() == (
        SyntheticSpec(regimens=150, vulnerable_age=60).cache_key()
    )
    with pytest.raises(ValueError, match="extra_ddi_pairs must be >= 0"):
        SyntheticSpec(extra_ddi_pairs=-1)
    with pytest.raises(ValueError, match="only .* unlabelled pairs of indicated drugs exist"):
        generate_synthetic_cohort(SyntheticSpec(patients=5, extra_ddi_pairs=100_000))
