"""Molecule featurisation: atom graphs, WL fingerprints, BRICS substructures and the mask H."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from conftest import BENCHMARK, needs_benchmark

from datamodules.cohort import CohortError
from datamodules.molecules import (
    brics_fragments,
    fingerprint_keys,
    molecule_graphs,
    parse_smiles,
    require_molecules,
    substructure_mask,
)

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
PARACETAMOL = "CC(=O)Nc1ccc(O)cc1"
ETHANOL = "CCO"
SALT = "[Mg+2].[OH-].[OH-]"


def test_atom_graph_of_known_molecules():
    graphs = molecule_graphs({"A": [ETHANOL], "B": [ASPIRIN]}, ["A", "B"], radius=0, add_hydrogens=False)
    assert graphs.num_molecules == 2
    assert graphs.graphs.num_nodes == 3 + 13  # C2O + C9O4 heavy atoms
    assert graphs.graphs.num_edges == 2 * (2 + 13)  # bonds in both directions (aspirin: 13 bonds)
    assert graphs.molecule_drug.tolist() == [0, 1]
    # radius 0 = atom types: C, O (ethanol), then aromatic c (aspirin)
    assert graphs.fingerprints == ("C", "O", "C:aromatic")
    aspirin_atoms = graphs.graphs.x[graphs.graphs.batch == 1]
    assert (aspirin_atoms == 2).sum() == 6 and (aspirin_atoms == 1).sum() == 4

    with_h = molecule_graphs({"A": [ETHANOL]}, ["A"], radius=0, add_hydrogens=True)
    assert with_h.graphs.num_nodes == 9 and with_h.graphs.num_edges == 16  # C2H6O: 8 bonds
    assert set(with_h.fingerprints) == {"C", "O", "H"}


def test_weisfeiler_lehman_keys_separate_environments():
    # propane: the two methyl carbons are equivalent, the middle one is not
    keys, edges = fingerprint_keys(parse_smiles("CCC"), radius=1)
    assert keys[0] == keys[2] != keys[1]
    assert sorted(edges) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    # ids are shared across molecules: ethanol's methyl carbon (a C-C bond) is propane's;
    # its CH2 (bonded to C and O) and its O are new
    graphs = molecule_graphs({"P": ["CCC"], "E": [ETHANOL]}, ["P", "E"], radius=1, add_hydrogens=False)
    assert graphs.num_fingerprints == 2 + 2
    assert graphs.graphs.x.tolist() == [0, 1, 0, 0, 2, 3]
    # atoms without bonds (a salt) keep a key of their own
    keys, edges = fingerprint_keys(parse_smiles(SALT), radius=2)
    assert len(keys) == 3 and edges == [] and keys[1] == keys[2] != keys[0]


def test_unparseable_smiles_are_reported_and_drugs_without_molecule_listed(caplog):
    smiles = {"A": ["not a smiles", ETHANOL], "B": ["C1CC"], "C": []}
    with caplog.at_level("WARNING"):
        graphs = molecule_graphs(smiles, ["A", "B", "C", "D"])
    assert graphs.unparsed == (("A", "not a smiles"), ("B", "C1CC"))
    assert "could not parse 2 SMILES" in caplog.text
    assert graphs.molecule_drug.tolist() == [0]
    assert graphs.missing == (1, 2, 3)
    assert graphs.molecules_per_drug().tolist() == [1, 0, 0, 0]
    with pytest.raises(CohortError, match=r"3 drug\(s\) have no parseable SMILES: \['B', 'C', 'D'\]"):
        require_molecules(graphs.missing, ["A", "B", "C", "D"], by="SafeDrug")


def test_brics_fragments_of_aspirin():
    assert brics_fragments(parse_smiles(ASPIRIN)) == ["[1*]C(C)=O", "[16*]c1ccccc1[16*]", "[3*]O[3*]", "[6*]C(=O)O"]
    assert brics_fragments(parse_smiles(ETHANOL)) == ["CCO"]  # nothing to break


def test_substructure_mask_shape_sharing_and_placeholders():
    smiles = {"N02B": [PARACETAMOL], "B01A": [ASPIRIN], "X": ["??"]}
    mask = substructure_mask(smiles, ["N02B", "B01A", "X"])
    # paracetamol: acetyl, hydroxyphenyl, amide N; aspirin adds 4, sharing the acetyl group
    assert mask.substructures[:3] == ("[1*]C(C)=O", "[16*]c1ccc(O)cc1", "[5*]N[5*]")
    assert mask.H.shape == (3, 3 + 3 + 1)
    assert mask.H.sum(1).tolist() == [3, 4, 1]
    shared = mask.substructures.index("[1*]C(C)=O")
    assert mask.H[:, shared].tolist() == [1, 1, 0]
    assert mask.substructures[-1] == "<no molecule: X>" and mask.H[2, -1] == 1
    assert mask.missing == (2,)
    without = substructure_mask(smiles, ["N02B", "B01A", "X"], placeholders=False)
    assert without.H.shape == (3, 6) and without.H[2].sum() == 0
    assert set(np.unique(mask.H)) == {0.0, 1.0}


def test_results_are_cached_in_process_and_on_disk(private_cache):
    smiles = {"A": [ASPIRIN], "B": [ETHANOL, PARACETAMOL]}
    first = molecule_graphs(smiles, ["A", "B"])
    assert molecule_graphs(dict(smiles), ["A", "B"]) is first
    mask = substructure_mask(smiles, ["A", "B"])
    files = list(private_cache.glob("molecules-*.json"))
    assert files, "substructure mask not cached on disk"
    stored = [json.loads(f.read_text()) for f in files]
    assert any(s["substructures"] == list(mask.substructures) for s in stored)
    # another vocabulary order is another featurisation: same fingerprints, other ids
    other = molecule_graphs(smiles, ["B", "A"])
    assert other.molecule_drug.tolist() == [0, 0, 1]
    assert set(other.fingerprints) == set(first.fingerprints) and other.fingerprints != first.fingerprints
    aspirin_here = first.graphs.x[first.graphs.batch == 0]
    aspirin_there = other.graphs.x[other.graphs.batch == 2]
    assert [first.fingerprints[i] for i in aspirin_here] == [other.fingerprints[i] for i in aspirin_there]


def test_synthetic_cohort_molecules(tiny_cohort):
    meds = tiny_cohort.vocab["medication"]
    graphs = molecule_graphs(tiny_cohort.smiles, meds)
    mask = substructure_mask(tiny_cohort.smiles, meds)
    assert graphs.missing == () and graphs.unparsed == ()
    assert graphs.molecules_per_drug().min() >= 1
    assert mask.H.shape[0] == len(meds) and (mask.H.sum(1) >= 1).all()
    assert 0.005 < mask.H.mean() < 0.05  # sparse: a drug holds a few of hundreds of fragments


@needs_benchmark
def test_benchmark_mask_matches_the_reference_file():
    from datamodules.benchmark import read_benchmark

    cohort = read_benchmark(BENCHMARK)
    meds = cohort.vocab["medication"]
    with open(BENCHMARK / "ddi_mask_H.pkl", "rb") as fh:
        reference = np.asarray(pickle.load(fh))
    assert reference.shape[0] == len(meds) == 112
    # BRICS of a few very large molecules takes seconds; the rest of the vocabulary suffices here
    small = [d for d, code in enumerate(meds) if max(parse_smiles(s).GetNumAtoms() for s in cohort.smiles[code]) < 60]
    assert len(small) >= 100
    mask = substructure_mask(cohort.smiles, [meds[d] for d in small])
    ref = reference[small]
    ref = ref[:, ref.sum(0) > 0]
    assert abs(mask.H.shape[1] - ref.shape[1]) <= 5  # rdkit versions differ slightly
    assert (mask.H.sum(1) == ref.sum(1)).mean() >= 0.98
    shared = mask.H @ mask.H.T  # fragments shared by two drugs do not depend on column order
    assert (shared != ref @ ref.T).sum() <= 4
