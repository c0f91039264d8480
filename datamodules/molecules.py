"""Drug molecules as atom graphs and as BRICS substructures, for every drug of a vocabulary.

Both products are pure functions of ``smiles`` ({medication code: [SMILES, ...]}, as in a
cohort's ``smiles.json`` and ``CohortKnowledge.smiles``) and the medication vocabulary (a list
of codes, index = drug index). Equal inputs give equal outputs, ids included, so a model
rebuilds exactly the same featurisation from the knowledge stored in its checkpoint, and any
method (or the raw-MIMIC ETL, for a cohort's substructure mask) can reuse them.

* :func:`molecule_graphs` parses every SMILES with rdkit into an atom graph whose nodes carry
  Weisfeiler-Lehman fingerprint ids (atom symbol + aromaticity, refined ``radius`` times over
  bonded neighbours and bond types; SafeDrug's featurisation), batched into one
  torch-geometric ``Batch`` with the drug index of every molecule.
* :func:`substructure_mask` decomposes every molecule with BRICS (rdkit) into fragments; the
  union over the vocabulary is the substructure vocabulary and ``H[drug, substructure] = 1``
  when one of the drug's molecules contains the fragment (SafeDrug's bipartite mask).

SMILES that rdkit cannot parse are skipped and reported (a warning, and ``unparsed`` in the
results). A drug left without any molecule is listed in ``missing``; callers choose between
a clear error (:func:`require_molecules`) and a learned fallback: graph users give such a drug
a learned embedding instead of a molecule vector, and the mask gives it one private
placeholder column (``<no molecule: CODE>``) so a masked layer still has a weight for it.

Results are cached in-process, and the substructure mask also on disk (``molecules-*.json``
under $MEDREC_CACHE or ~/.cache/medrec): BRICS decomposition of the benchmark's 269 molecules
takes about 5 s (a few large molecules dominate), the atom graphs well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import rdkit
import torch
from rdkit import Chem, RDLogger
from rdkit.Chem import BRICS
from torch_geometric.data import Batch, Data

from datamodules.atomic import write_file
from datamodules.cache import cache_name, default_cache_dir
from datamodules.cohort import CohortError

log = logging.getLogger(__name__)

PLACEHOLDER = "<no molecule: {code}>"


# --- parsing ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def parse_smiles(smiles: str) -> Chem.Mol | None:
    """rdkit molecule of ``smiles``, or None when rdkit cannot parse it (rdkit's own log muted)."""
    if not isinstance(smiles, str) or not smiles.strip():
        return None
    RDLogger.DisableLog("rdApp.*")
    try:
        return Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")


def _parsed_molecules(smiles: Mapping[str, Sequence[str]], medications: Sequence[str]):
    """(drug index, SMILES, Mol) of every parseable molecule, plus the unparsed (code, SMILES)."""
    parsed, unparsed = [], []
    for d, code in enumerate(medications):
        for text in smiles.get(code, ()) or ():
            mol = parse_smiles(text)
            if mol is None or mol.GetNumAtoms() == 0:
                unparsed.append((code, text))
            else:
                parsed.append((d, text, mol))
    if unparsed:
        shown = ", ".join(f"{c}: {s!r}" for c, s in unparsed[:5])
        more = f" and {len(unparsed) - 5} more" if len(unparsed) > 5 else ""
        log.warning("rdkit could not parse %d SMILES, skipped: %s%s", len(unparsed), shown, more)
    return parsed, unparsed


def _missing(medications: Sequence[str], parsed) -> list[int]:
    have = {d for d, _, _ in parsed}
    return [d for d in range(len(medications)) if d not in have]


def require_molecules(missing: Sequence[int], medications: Sequence[str], by: str = "this model") -> None:
    """Raise a CohortError naming the drugs that have no parseable molecule (if any)."""
    if missing:
        codes = [medications[d] for d in missing]
        raise CohortError(
            f"{by} needs a molecule for every drug, but {len(codes)} drug(s) have no parseable SMILES: "
            f"{codes[:10]}{' ...' if len(codes) > 10 else ''}; add SMILES to the cohort's smiles.json "
            "or allow the learned fallback embedding"
        )


KNOWLEDGE_SECTION = 'README "Where each file comes from"'
MOLECULE_SOURCES = (
    "DrugBank's drugbank_drugs_info.csv (or a processed atc3toSMILES.pkl / idx2drug.pkl) in the mappings "
    "folder when the cohort is built from raw MIMIC, or SMILES in the cohort's smiles.json"
)


def molecule_coverage(
    missing: Sequence[int], medications: Sequence[str], by: str, allow_none: bool, source: str = "the cohort"
) -> str | None:
    """Check how many drugs have a molecule: none at all is refused unless ``allow_none``.

    Returns the warning to give once (count and share of drugs left to a learned fallback), or
    None when every drug has a molecule. The error names the files that supply molecules, the
    README section on where to get them, and the option that accepts the fallback.
    """
    if not missing:
        return None
    total = len(medications)
    if len(missing) == total and not allow_none:
        raise CohortError(
            f"{by} needs drug molecules, but none of the {total} drug(s) of {source} has a parseable SMILES: "
            f"supply {MOLECULE_SOURCES} (see {KNOWLEDGE_SECTION}), or pass "
            f"--model.init_args.allow_missing_molecules=true to train on learned fallback embeddings instead"
        )
    codes = [medications[d] for d in missing]
    return (
        f"{by}: {len(codes)} of {total} drug(s) ({100 * len(codes) / total:.1f} %) have no parseable molecule "
        f"and use a learned fallback embedding: {codes[:10]}{' ...' if len(codes) > 10 else ''}"
    )


# --- atom graphs -----------------------------------------------------------------------
def _digest(*parts) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def fingerprint_keys(mol: Chem.Mol, radius: int = 2) -> tuple[list[str], list[tuple[int, int]]]:
    """Weisfeiler-Lehman fingerprint key of every atom of ``mol`` and its bonds (both directions).

    Radius 0 keys are the atom symbol, marked when aromatic (``"c:aromatic"``). Each round
    replaces an atom's key by a digest of (its key, sorted (neighbour key, bond key) pairs) and a
    bond's key by a digest of (its sorted end keys, its key); bond keys start as the rdkit bond
    type. Atoms without bonds (ions in salts) keep refining their own key. Keys are stable
    strings, so ids built from them do not depend on the order molecules are seen in.
    """
    nodes = [f"{a.GetSymbol()}:aromatic" if a.GetIsAromatic() else a.GetSymbol() for a in mol.GetAtoms()]
    neighbours: list[list[tuple[int, int]]] = [[] for _ in nodes]  # (atom, bond index)
    bond_keys: list[str] = []
    edges: list[tuple[int, int]] = []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        neighbours[i].append((j, len(bond_keys)))
        neighbours[j].append((i, len(bond_keys)))
        bond_keys.append(str(bond.GetBondType()))
        edges += [(i, j), (j, i)]
    ends = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
    for _ in range(radius):
        new_nodes = [
            _digest(nodes[i], tuple(sorted((nodes[j], bond_keys[b]) for j, b in neighbours[i])))
            for i in range(len(nodes))
        ]
        bond_keys = [_digest(tuple(sorted((nodes[i], nodes[j]))), key) for (i, j), key in zip(ends, bond_keys)]
        nodes = new_nodes
    return nodes, edges


@dataclass(frozen=True)
class MoleculeGraphs:
    """All parseable molecules of a medication vocabulary, batched for one MPNN pass.

    Attributes:
        graphs: torch-geometric ``Batch``; ``x`` (N,) long fingerprint ids, ``edge_index`` (2, E)
            bonds in both directions, ``batch`` (N,) molecule of every atom.
        molecule_drug: (num_molecules,) long, drug index of every molecule.
        smiles: the SMILES of every molecule, in batch order.
        fingerprints: fingerprint key of every id (``len`` = size of the embedding table).
        num_drugs: size of the medication vocabulary.
        missing: drug indices without any parseable molecule (sorted).
        unparsed: (code, SMILES) pairs rdkit could not parse.
    """

    graphs: Batch
    molecule_drug: torch.Tensor
    smiles: tuple[str, ...]
    fingerprints: tuple[str, ...]
    num_drugs: int
    missing: tuple[int, ...]
    unparsed: tuple[tuple[str, str], ...]

    @property
    def num_molecules(self) -> int:
        return len(self.smiles)

    @property
    def num_fingerprints(self) -> int:
        return len(self.fingerprints)

    def molecules_per_drug(self) -> torch.Tensor:
        return torch.bincount(self.molecule_drug, minlength=self.num_drugs)


def molecule_graphs(
    smiles: Mapping[str, Sequence[str]],
    medications: Sequence[str],
    radius: int = 2,
    add_hydrogens: bool = True,
) -> MoleculeGraphs:
    """Featurise the molecules of every drug in ``medications`` (cached per input).

    Args:
        smiles: medication code -> SMILES strings (a code may be absent or map to []).
        medications: the medication vocabulary; molecule i belongs to drug ``molecule_drug[i]``.
        radius: Weisfeiler-Lehman rounds of :func:`fingerprint_keys` (SafeDrug reference: 2).
        add_hydrogens: make hydrogens explicit atoms first (as the SafeDrug reference does).
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    key = _cache_key(smiles, medications)
    return _molecule_graphs(key, radius, bool(add_hydrogens))


def _cache_key(smiles: Mapping[str, Sequence[str]], medications: Sequence[str]):
    meds = tuple(str(m) for m in medications)
    return meds, tuple(tuple(smiles.get(code, ()) or ()) for code in meds)


@functools.lru_cache(maxsize=16)
def _molecule_graphs(key, radius: int, add_hydrogens: bool) -> MoleculeGraphs:
    medications, lists = key
    parsed, unparsed = _parsed_molecules(dict(zip(medications, lists)), medications)
    ids: dict[str, int] = {}
    data, drug_of, texts = [], [], []
    for d, text, mol in parsed:
        if add_hydrogens:
            mol = Chem.AddHs(mol)
        keys, edges = fingerprint_keys(mol, radius)
        x = torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long)
        edge_index = torch.tensor(edges, dtype=torch.long).reshape(-1, 2).t().contiguous()
        data.append(Data(x=x, edge_index=edge_index, num_nodes=len(keys)))
        drug_of.append(d)
        texts.append(text)
    if data:
        graphs = Batch.from_data_list(data)
    else:  # no molecule at all: an empty batch with the same fields
        empty = torch.zeros(0, dtype=torch.long)
        graphs = Batch(x=empty, edge_index=empty.reshape(2, 0), batch=empty, ptr=torch.zeros(1, dtype=torch.long))
    return MoleculeGraphs(
        graphs=graphs,
        molecule_drug=torch.tensor(drug_of, dtype=torch.long),
        smiles=tuple(texts),
        fingerprints=tuple(ids),
        num_drugs=len(medications),
        missing=tuple(_missing(medications, parsed)),
        unparsed=tuple(unparsed),
    )


# --- BRICS substructures ---------------------------------------------------------------
def brics_fragments(mol: Chem.Mol) -> list[str]:
    """Sorted BRICS fragment SMILES of ``mol`` (a molecule without breakable bonds is one fragment)."""
    try:
        return sorted(BRICS.BRICSDecompose(mol))
    except Exception:  # rdkit raises plain RuntimeErrors on a few exotic structures
        return [Chem.MolToSmiles(mol)]


@dataclass(frozen=True)
class SubstructureMask:
    """SafeDrug's drug x substructure bipartite mask.

    Attributes:
        H: (num_drugs, num_substructures) float32 0/1; ``H[d, s] = 1`` when a molecule of drug d
            contains BRICS fragment s (or s is drug d's placeholder).
        substructures: fragment SMILES of every column (placeholders read ``<no molecule: CODE>``).
        missing: drug indices without any parseable molecule (sorted).
        unparsed: (code, SMILES) pairs rdkit could not parse.
    """

    H: np.ndarray
    substructures: tuple[str, ...]
    missing: tuple[int, ...]
    unparsed: tuple[tuple[str, str], ...]

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.H, dtype=torch.float32)


def substructure_mask(
    smiles: Mapping[str, Sequence[str]],
    medications: Sequence[str],
    placeholders: bool = True,
) -> SubstructureMask:
    """BRICS substructure vocabulary and mask H of the drugs in ``medications`` (cached per input).

    Columns are ordered by first appearance, walking the drugs in vocabulary order and each
    drug's fragments in sorted order. With ``placeholders`` every drug without a parseable
    molecule gets one private column, so no row of H is empty.
    """
    return _substructure_mask(_cache_key(smiles, medications), bool(placeholders))


MASK_CACHE_VERSION = 1


@functools.lru_cache(maxsize=16)
def _substructure_mask(key, placeholders: bool) -> SubstructureMask:
    medications, lists = key
    name = cache_name("molecules", [MASK_CACHE_VERSION, rdkit.__version__, key, placeholders], length=16)
    path = default_cache_dir() / f"{name}.json"
    try:
        stored = json.loads(path.read_text())
        return _mask_from_cells(len(medications), stored["substructures"], stored["cells"], stored)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: compute (and rewrite) it
    parsed, unparsed = _parsed_molecules(dict(zip(medications, lists)), medications)
    missing = _missing(medications, parsed)
    columns: dict[str, int] = {}
    cells: list[tuple[int, int]] = []
    by_drug: dict[int, list[Chem.Mol]] = {}
    for d, _, mol in parsed:
        by_drug.setdefault(d, []).append(mol)
    for d in range(len(medications)):
        if d in by_drug:
            fragments = sorted({f for mol in by_drug[d] for f in brics_fragments(mol)})
        elif placeholders:
            fragments = [PLACEHOLDER.format(code=medications[d])]
        else:
            fragments = []
        cells += [(d, columns.setdefault(f, len(columns))) for f in fragments]
    stored = {"substructures": list(columns), "cells": cells, "missing": missing, "unparsed": unparsed}
    _write_cache(path, json.dumps(stored))
    return _mask_from_cells(len(medications), list(columns), cells, stored)


def _mask_from_cells(num_drugs: int, substructures: list[str], cells, stored: dict) -> SubstructureMask:
    H = np.zeros((num_drugs, len(substructures)), dtype=np.float32)
    if len(cells):
        rows, cols = zip(*cells)
        H[list(rows), list(cols)] = 1.0
    H.setflags(write=False)
    return SubstructureMask(
        H=H,
        substructures=tuple(substructures),
        missing=tuple(int(d) for d in stored["missing"]),
        unparsed=tuple((str(c), str(s)) for c, s in stored["unparsed"]),
    )


def _write_cache(path, text: str) -> None:
    """Best effort: a cache that cannot be written only costs the recomputation next time."""
    try:
        write_file(path, text)
    except OSError as err:
        log.debug("could not cache %s: %s", path, err)


# --- categorical atom/bond features (OGB style) ----------------------------------------
@dataclass(frozen=True)
class FeatureGraphs:
    """Molecules as graphs with categorical atom and bond features, batched for one GNN pass.

    Features are torch-geometric's ``from_smiles`` (the OGB molecule featurisation that GIN
    encoders such as MoleRec's use): ``x`` (N, 9) long atom features, ``edge_attr`` (E, 3) long
    bond features, ``edge_index`` in both directions, ``batch`` the graph of every atom.
    ``parsed`` lists the positions (in the input order) of the SMILES that rdkit could parse; the
    batch holds one graph per parsed SMILES, in that order.
    """

    graphs: Batch
    parsed: tuple[int, ...]


def feature_graphs(smiles: Sequence[str]) -> FeatureGraphs:
    """Featurise ``smiles`` (any molecules or fragments, BRICS dummy atoms included; cached)."""
    return _feature_graphs(tuple(str(s) for s in smiles))


@functools.lru_cache(maxsize=16)
def _feature_graphs(smiles: tuple[str, ...]) -> FeatureGraphs:
    from torch_geometric.utils import from_smiles

    parsed = [i for i, text in enumerate(smiles) if (mol := parse_smiles(text)) is not None and mol.GetNumAtoms()]
    RDLogger.DisableLog("rdApp.*")
    try:
        data = [from_smiles(smiles[i]) for i in parsed]
    finally:
        RDLogger.EnableLog("rdApp.*")
    for graph in data:
        del graph.smiles  # strings would be collated into a list the models never read
    if data:
        graphs = Batch.from_data_list(data)
    else:
        empty = torch.zeros(0, dtype=torch.long)
        graphs = Batch(
            x=empty.reshape(0, 9), edge_index=empty.reshape(2, 0), edge_attr=empty.reshape(0, 3), batch=empty,
            ptr=torch.zeros(1, dtype=torch.long),
        )  # fmt: skip
    return FeatureGraphs(graphs=graphs, parsed=tuple(parsed))
