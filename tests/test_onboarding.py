"""Data onboarding: raw MIMIC + the field's published mapping/knowledge files -> a trained model,
with every common variant of each file, and models refusing a cohort that lacks what they need.

The files are written here in their published formats (SafeDrug's and GAMENet's spellings,
their processed pickles as old dill wrote them); nothing is downloaded. The demo-table tests
run when ../shared is present and skip otherwise; the others need nothing from it.
"""

from __future__ import annotations

import ast
import logging
import pickle
import shutil
import sys
from pathlib import Path

import dill
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA, first_batch, quiet_trainer, write_cohort

from benchmarks.synthetic_raw import RawSpec, write_raw_mimic
from callbacks import DDIAnnealing, PIDDDIController
from datamodules.cohort import Cohort, CohortError
from datamodules.mimic import EtlOptions, build_cohort
from datamodules.mimic.cli import main as prepare_main
from datamodules.mimic.mappings import read_third_party_pickle
from datamodules.synthetic import SyntheticSpec, generate_synthetic_cohort
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import GAMENet, SafeDrug
from train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = SHARED_DATA / "mimic3-demo"
SHARED_MAPPINGS = SHARED_DATA / "mappings"
SECTION = 'README "Where each file comes from"'
ALL = dict(min_admissions=1, top_diagnoses=None, top_medications=None)


# --- published formats, written by the test -------------------------------------------------
class _Call:
    """A pickled call ``func(*args)`` whose ``func`` is itself such a call (dill's ``_load_type('CodeType')``)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __call__(self, *args):  # pickle insists that a reduce function be callable
        raise AssertionError("never called")


def _load_type(name: str) -> _Call:
    return _Call(dill._dill._load_type, name)


class _OldDillPickler(pickle.Pickler):
    """Writes ``voc_final.pkl`` / ``ddi_A_final.pkl`` the way dill 0.2/0.3 under Python 3.6/3.7 did:
    the ``Voc`` class stored by value with a 15-argument code object (which Python >= 3.8 cannot
    build), numpy arrays as ``_create_array(_get_attr(_import_module(...), '_reconstruct'), ...)``."""

    def __init__(self, fh, voc_class=None):
        super().__init__(fh, protocol=3)
        self.voc_class = voc_class

    def reducer_override(self, obj):
        if isinstance(obj, _Call):
            return obj.func, obj.args
        if obj is self.voc_class:
            code = _Call(_load_type("CodeType"), 1, 0, 1, 2, 67, b"i\x00|\x00_\x00d\x00S\x00", (None,),
                         ("idx2word", "word2idx"), ("self",), "<ipython-input-15>", "__init__", 4, b"\x00\x01",
                         (), ())  # fmt: skip
            init = _Call(dill._dill._create_function, code, {}, "__init__", None, None)
            namespace = {"__module__": "__main__", "__init__": init, "__doc__": None}
            return dill._dill._create_type, (_load_type("type"), "Voc", (_load_type("object"),), namespace)
        if isinstance(obj, np.ndarray):
            reconstruct = _Call(
                dill._dill._get_attr, _Call(dill._dill._import_module, "numpy.core._multiarray_umath"), "_reconstruct"
            )
            _, args, state = obj.__reduce__()
            return dill._dill._create_array, (reconstruct, args, state, {})
        return NotImplemented


class Voc:
    pass


def write_old_dill(path: Path, obj) -> None:
    with open(path, "wb") as fh:
        _OldDillPickler(fh, voc_class=Voc).dump(obj)


def write_vocabularies(path: Path, diag, proc, meds) -> None:
    """voc_final.pkl as GAMENet/SafeDrug dumped it: ``Voc`` instances of a class stored by value."""
    vocabularies = {}
    for key, words in (("diag_voc", diag), ("pro_voc", proc), ("med_voc", meds)):
        voc = Voc.__new__(Voc)
        voc.idx2word = dict(enumerate(words))
        voc.word2idx = {w: i for i, w in enumerate(words)}
        vocabularies[key] = voc
    write_old_dill(path, vocabularies)


def write_vocabulary(path: Path, medications: list[str], specials=("seperator", "decoder_point")) -> None:
    """A release's voc_final.pkl; GAMENet's medication vocabulary starts with two special tokens."""
    write_vocabularies(path, ["4019"], ["3893"], [*specials, *medications])


def write_ddi_matrix(path: Path, codes: list[str], pairs) -> None:
    index = {c: i for i, c in enumerate(codes)}
    adj = np.zeros((len(codes), len(codes)))
    for a, b in pairs:
        adj[index[a], index[b]] = adj[index[b], index[a]] = 1
    write_old_dill(path, adj)


def write_idx2drug(path: Path, smiles: dict[str, list[str]]) -> None:
    """The SafeDrug paper release's idx2drug.pkl: dict ATC3 -> set, sets via dill's ``_load_type('set')``."""
    data = {"seperator": {}, **{code: _Call(_load_type("set"), list(values)) for code, values in smiles.items()}}
    with open(path, "wb") as fh:
        _OldDillPickler(fh).dump(data)


def gamenet_spellings(safedrug: Path, out: Path, atc_column: str = "ATC4") -> None:
    """GAMENet's names for the two NDC -> ATC files (same content; ``ATC5`` as some copies have it)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(safedrug / "ndc2RXCUI.txt", out / "ndc2rxnorm_mapping.txt")
    table = pd.read_csv(safedrug / "RXCUI2atc4.csv", dtype=str)
    table.rename(columns={"ATC4": atc_column}).to_csv(out / "ndc2atc_level4.csv", index=False)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Synthetic raw MIMIC-III tables; the SafeDrug-named mapping files sit apart in ``maps``."""
    folder = tmp_path_factory.mktemp("onboarding")
    cohort = generate_synthetic_cohort(SyntheticSpec(patients=60, seed=5))
    tables = Path(write_raw_mimic(cohort, folder / "mimic3", RawSpec(layout="mimic3", compress=False)).folder)
    shutil.move(str(tables / "mappings"), str(folder / "maps"))
    return tables, folder / "maps"


@pytest.fixture(scope="module")
def reference(raw):
    """The cohort built from the SafeDrug-named raw-source files (DrugBank, TWOSIDES)."""
    tables, maps = raw
    return build_cohort(tables, "mimic3", EtlOptions(mappings=str(maps), **ALL))[0]


# --- item 1: every published variant of each file ---------------------------------------------
def test_restricted_reader_reads_old_dill_files_and_runs_nothing(tmp_path):
    write_vocabulary(tmp_path / "voc_final.pkl", ["N02B", "A01A"])
    voc = read_third_party_pickle(tmp_path / "voc_final.pkl")
    assert voc["med_voc"].idx2word == {0: "seperator", 1: "decoder_point", 2: "N02B", 3: "A01A"}
    assert not hasattr(voc["med_voc"], "add_sentence") and not hasattr(type(voc["med_voc"]), "__init__code")
    write_ddi_matrix(tmp_path / "ddi_A_final.pkl", ["X", "Y", "Z"], [("X", "Z")])
    np.testing.assert_array_equal(
        read_third_party_pickle(tmp_path / "ddi_A_final.pkl"), [[0, 0, 1], [0, 0, 0], [1, 0, 0]]
    )
    write_idx2drug(tmp_path / "idx2drug.pkl", {"A01A": ["CCO", "C"]})
    assert read_third_party_pickle(tmp_path / "idx2drug.pkl") == {"seperator": {}, "A01A": {"CCO", "C"}}
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(shutil.rmtree))  # a non-data global
    (tmp_path / "evil2.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    for name in ("evil.pkl", "evil2.pkl"):
        with pytest.raises(CohortError, match=rf"{name}: cannot be read as a data pickle.*refusing"):
            read_third_party_pickle(tmp_path / name)


@pytest.mark.parametrize("atc_column", ["ATC4", "ATC5"])
def test_gamenet_spellings_and_processed_pickles_give_the_reference_cohort(raw, reference, tmp_path, atc_column):
    """GAMENet's ndc2rxnorm_mapping.txt + ndc2atc_level4.csv, SMILES from idx2drug.pkl and DDI pairs
    from ddi_A_final.pkl + voc_final.pkl: the same drugs, molecules and adverse pairs."""
    tables, maps = raw
    gamenet_spellings(maps, tmp_path, atc_column)
    shutil.copy(maps / "drug-atc.csv", tmp_path)
    release = [*reversed(reference.vocab["medication"]), "Z99Z"]  # another order, one drug not in the cohort
    write_vocabulary(tmp_path / "voc_final.pkl", release)
    write_ddi_matrix(tmp_path / "ddi_A_final.pkl", ["seperator", "decoder_point", *release], [*reference.ddi_pairs,
                     (release[0], "Z99Z")])  # fmt: skip
    write_idx2drug(tmp_path / "idx2drug.pkl", reference.smiles)
    cohort, report = build_cohort(tables, "mimic3", EtlOptions(mappings=str(tmp_path), **ALL))
    assert report["drug_mapping"]["source"].endswith("ndc2rxnorm_mapping.txt + " + str(tmp_path / "ndc2atc_level4.csv"))
    assert report["smiles"]["source"].endswith("idx2drug.pkl") and report["ddi"]["source"].endswith("ddi_A_final.pkl")
    assert cohort.vocab == reference.vocab
    assert sorted(cohort.ddi_pairs) == sorted(reference.ddi_pairs) and len(cohort.ddi_pairs) > 0
    assert {k: sorted(v) for k, v in cohort.smiles.items()} == {k: sorted(v) for k, v in reference.smiles.items()}
    pd.testing.assert_frame_equal(cohort.visits, reference.visits)


def test_plain_ndc_atc_csv_and_atc3_to_smiles_pickle(raw, reference, tmp_path):
    tables, maps = raw
    ndc = ast.literal_eval((maps / "ndc2RXCUI.txt").read_text())
    atc = pd.read_csv(maps / "RXCUI2atc4.csv", dtype=str).drop_duplicates("RXCUI").set_index("RXCUI")["ATC4"]
    pd.DataFrame([(n, atc[r]) for n, r in ndc.items() if r in atc.index], columns=["ndc", "atc"]).to_csv(
        tmp_path / "ndc_atc.csv", index=False
    )
    with open(tmp_path / "atc3toSMILES.pkl", "wb") as fh:  # SafeDrug's: a plain pickle of lists
        pickle.dump(reference.smiles, fh, protocol=4)
    cohort, report = build_cohort(tables, "mimic3", EtlOptions(mappings=str(tmp_path), **ALL))
    assert report["drug_mapping"]["source"] == str(tmp_path / "ndc_atc.csv")
    assert cohort.vocab["medication"] == reference.vocab["medication"] and cohort.smiles == reference.smiles
    assert cohort.ddi_pairs == [] and any("no drug-DDI.csv / drug-atc.csv" in n for n in report["notes"])


def test_ddi_matrix_of_another_release_is_refused(raw, reference, tmp_path):
    tables, maps = raw
    for name in ("ndc2RXCUI.txt", "RXCUI2atc4.csv"):
        shutil.copy(maps / name, tmp_path)
    write_vocabulary(tmp_path / "voc_final.pkl", reference.vocab["medication"])
    write_ddi_matrix(tmp_path / "ddi_A_final.pkl", ["A01A", "B01A"], [])
    with pytest.raises(CohortError, match=r"ddi_A_final\.pkl: 2 rows, but .*voc_final\.pkl has \d+ codes"):
        build_cohort(tables, "mimic3", EtlOptions(mappings=str(tmp_path), **ALL))


# --- item 1: the errors name the file, the README section and the option -----------------------
def test_missing_mapping_from_train_py_names_file_section_and_datamodule_option(raw, tmp_path, capsys, monkeypatch):
    tables, maps = raw
    monkeypatch.delenv("MEDREC_MAPPINGS", raising=False)
    partial = tmp_path / "maps"
    partial.mkdir()
    shutil.copy(maps / "ndc2RXCUI.txt", partial)
    args = ["fit", "--config", str(ROOT / "configs" / "lr.yaml"), f"--data.init_args.root={tables}",
            f"--data.init_args.mappings={partial}", f"--data.init_args.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        train_main(args)
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medrec: error")]
    assert len(err) == 1 and err[0].startswith("medrec: error: no NDC -> ATC drug mapping found")
    assert "missing RXCUI2atc4.csv (or ndc2atc_level4.csv)" in err[0] and SECTION in err[0]
    assert "--data.init_args.mappings=DIR" in err[0] and "--rxcui2atc4" not in err[0]

    with pytest.raises(SystemExit):
        prepare_main([str(tables), "--mappings", str(partial), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert "missing RXCUI2atc4.csv" in err and "--rxcui2atc4" in err and SECTION in err
    assert "--data.init_args" not in err


# --- item 1: README's raw-data commands reach a trained model ----------------------------------
README_PREPARE = "medrec-prepare /data/physionet.org/files/mimiciii/1.4 --mappings ~/medrec-maps --out cohorts/mimic3"
README_FIT = (
    "python train.py fit  --config configs/safedrug.yaml --data.init_args.root=cohorts/mimic3 "
    "--checkpoint.dirpath=checkpoints/safedrug-mimic3"
)
README_TEST = (
    "python train.py test --config configs/safedrug.yaml --data.init_args.root=cohorts/mimic3 "
    "--ckpt_path=checkpoints/safedrug-mimic3/last.ckpt"
)
README_DIRECT = (
    "python train.py fit --config configs/safedrug.yaml --data.init_args.root=/data/physionet.org/files/mimiciii/1.4 "
    "--data.init_args.mappings=~/medrec-maps"
)
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def readme_argv(line: str, mimic: Path, maps: Path) -> list[str]:
    """README's command (checked verbatim) with the user's folders substituted, as argv after the program."""
    assert line in (ROOT / "README.md").read_text(), f"README no longer shows: {line}"
    line = line.replace("/data/physionet.org/files/mimiciii/1.4", str(mimic)).replace("~/medrec-maps", str(maps))
    words = line.split()
    return words[2:] if words[0] == "python" else words[1:]


def run_readme_commands(mimic: Path, maps: Path, folder: Path, monkeypatch, capsys) -> str:
    """README's prepare -> fit -> test, then the direct fit from the MIMIC folder; returns the ETL output."""
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MEDREC_MAPPINGS", raising=False)
    (folder / "configs").symlink_to(ROOT / "configs")
    prepare_main(readme_argv(README_PREPARE, mimic, maps))
    prepared = capsys.readouterr().out
    train_main([*readme_argv(README_FIT, mimic, maps), *QUICK])
    assert (folder / "checkpoints" / "safedrug-mimic3" / "last.ckpt").is_file()
    assert "medrec: fit done after 1 epoch(s)" in capsys.readouterr().out
    train_main(readme_argv(README_TEST, mimic, maps))
    assert "test_jaccard" in capsys.readouterr().out
    monkeypatch.setenv("MEDREC_CACHE", str(folder / "cache"))
    train_main([*readme_argv(README_DIRECT, mimic, maps), *QUICK])
    assert "medrec: fit done after 1 epoch(s)" in capsys.readouterr().out
    return prepared


def test_readme_commands_from_raw_tables_with_gamenet_files(raw, reference, tmp_path, monkeypatch, capsys):
    """Synthetic raw tables, a mapping folder in GAMENet's spellings with processed pickles: no ../shared."""
    tables, maps = raw
    user = tmp_path / "maps"
    gamenet_spellings(maps, user)
    shutil.copy(maps / "drug-atc.csv", user)
    write_vocabulary(user / "voc_final.pkl", reference.vocab["medication"])
    write_ddi_matrix(user / "ddi_A_final.pkl", ["seperator", "decoder_point", *reference.vocab["medication"]],
                     reference.ddi_pairs)  # fmt: skip
    write_idx2drug(user / "idx2drug.pkl", reference.smiles)
    (tmp_path / "work").mkdir()
    out = run_readme_commands(tables, user, tmp_path / "work", monkeypatch, capsys)
    assert "train with --data.init_args.root=" in out
    cohort = Cohort.load(tmp_path / "work" / "cohorts" / "mimic3")
    assert len(cohort.ddi_pairs) > 0 and set(cohort.smiles) == set(cohort.vocab["medication"])


DEMO_ATC4 = {  # the demo's most prescribed drugs by name (as in test_mimic_etl), and a molecule each
    "furosemide": ("C03CA", "NS(=O)(=O)c1cc(C(=O)O)c(NCc2ccco2)cc1Cl"),
    "sodium chloride": ("B05XA", "[Na+].[Cl-]"),
    "ns": ("B05XA", "[Na+].[Cl-]"),
    "potassium chloride": ("A12BA", "[K+].[Cl-]"),
    "magnesium sulfate": ("A12CC", "[Mg++].[O-]S([O-])(=O)=O"),
    "d5w": ("B05BA", "OCC1OC(O)C(O)C(O)C1O"),
    "dextrose": ("B05BA", "OCC1OC(O)C(O)C(O)C1O"),
    "heparin": ("B01AB", "CC(=O)NC1C(O)OC(CO)C(O)C1O"),
    "lr": ("B05BB", "CC(O)C([O-])=O.[Na+]"),
    "vancomycin": ("J01XA", "CC1OC(CC(C)(N)C1O)OC1C(O)C(O)C(CO)OC1O"),
    "morphine": ("N02AA", "CN1CCC23C4Oc5c3c(CC1C2C=CC4O)ccc5O"),
    "calcium gluconate": ("A12AA", "[Ca++].OCC(O)C(O)C(O)C(O)C([O-])=O"),
    "acetaminophen": ("N02BE", "CC(=O)Nc1ccc(O)cc1"),
    "pantoprazole": ("A02BC", "COc1ccnc(CS(=O)c2nc3cc(OC(F)F)ccc3[nH]2)c1OC"),
    "metoprolol": ("C07AB", "COCCc1ccc(OCC(O)CNC(C)C)cc1"),
    "senna": ("A06AB", "OC1=CC=CC2=C1C(=O)C1=C(O)C=CC=C1C2=O"),
    "insulin": ("A10AE", None),  # a biologic: DrugBank has no SMILES for it
    "docusate": ("A06AA", "CCCCC(CC)COC(=O)CC(C(=O)OCC(CC)CCCC)S(O)(=O)=O"),
}


def write_demo_knowledge(folder: Path) -> None:
    """The files README names that ../shared lacks, in their published formats, for the demo's drugs:
    RXCUI2atc4.csv, DrugBank's drugbank_drugs_info.csv and TWOSIDES drug-DDI.csv (CIDs from the
    shared drug-atc.csv)."""
    folder.mkdir()
    for name in ("ndc2RXCUI.txt", "drug-atc.csv"):
        (folder / name).symlink_to(SHARED_MAPPINGS / name)
    ndc2rxcui = ast.literal_eval((SHARED_MAPPINGS / "ndc2RXCUI.txt").read_text())
    rx = pd.read_csv(DEMO / "PRESCRIPTIONS.csv.gz", dtype=str)
    rows, names = [], []
    for (ndc, drug), _ in rx.groupby(["ndc", "drug"]).size().sort_values(ascending=False).head(80).items():
        hit = next((v for k, v in DEMO_ATC4.items() if drug.lower().startswith(k)), None)
        if hit and ndc2rxcui.get(ndc):
            rows.append((ndc, ndc2rxcui[ndc], 2016, 1, hit[0]))
            names.append((drug, hit[1]))
    pd.DataFrame(rows, columns=["NDC", "RXCUI", "YEAR", "MONTH", "ATC4"]).to_csv(folder / "RXCUI2atc4.csv", index=False)
    drugbank = pd.DataFrame(names, columns=["name", "moldb_smiles"]).drop_duplicates("name")
    drugbank.insert(0, "drugbank_id", [f"DB{i:05d}" for i in range(len(drugbank))])
    drugbank.to_csv(folder / "drugbank_drugs_info.csv", index=False)
    cid_atc = [line.split(",") for line in (SHARED_MAPPINGS / "drug-atc.csv").read_text().splitlines()]
    by_class = {}
    for parts in cid_atc:
        for atc in parts[1:]:
            by_class.setdefault(atc[:4], parts[0])
    classes = sorted({a[:4] for a, _ in DEMO_ATC4.values()} & set(by_class))
    twosides = [(by_class[a], by_class[b], f"C{i:07d}", f"side effect {i}") for i, (a, b) in
                enumerate(zip(classes, classes[1:]))]  # fmt: skip
    pd.DataFrame(twosides, columns=["STITCH 1", "STITCH 2", "Polypharmacy Side Effect", "Side Effect Name"]).to_csv(
        folder / "drug-DDI.csv", index=False
    )


@pytest.mark.skipif(not (DEMO / "ADMISSIONS.csv.gz").is_file(), reason=f"MIMIC-III demo not found at {DEMO}")
def test_readme_commands_from_the_shared_demo_tables_and_mappings(tmp_path, monkeypatch, capsys):
    maps = tmp_path / "medrec-maps"
    write_demo_knowledge(maps)
    (tmp_path / "work").mkdir()
    out = run_readme_commands(DEMO, maps, tmp_path / "work", monkeypatch, capsys)
    cohort = Cohort.load(tmp_path / "work" / "cohorts" / "mimic3")
    assert len(cohort.vocab["medication"]) >= 10 and len(cohort.ddi_pairs) > 0
    assert set(cohort.smiles) == set(cohort.vocab["medication"])  # classes without a molecule dropped
    assert "A10A" not in cohort.vocab["medication"] and "without a molecule" in out


# --- item 2: a model that needs molecules or DDI pairs refuses a cohort without them ------------
def cohort_folder(tmp_path: Path, smiles: dict | None = None, ddi: bool = True) -> Path:
    folder = write_cohort(tmp_path / "c", n_patients=12)
    cohort = Cohort.load(folder)
    cohort.smiles = smiles or {}
    if not ddi:
        cohort.ddi_pairs = []
    return cohort.save(tmp_path / "c2")


def test_safedrug_refuses_a_cohort_without_molecules(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = VisitSequenceDataModule(root=str(cohort_folder(tmp_path)), batch_size=4)
    with pytest.raises(CohortError) as err:
        _fit(SafeDrug(knowledge=dm.knowledge), dm, [])
    message = str(err.value)
    assert "none of the 4 drug(s)" in message and "drugbank_drugs_info.csv" in message and SECTION in message
    assert "--model.init_args.allow_missing_molecules=true" in message
    with pytest.raises(SystemExit) as stop:
        train_main(["fit", "--config", str(ROOT / "configs" / "safedrug.yaml"),
                    f"--data.init_args.root={tmp_path / 'c2'}", *QUICK])  # fmt: skip
    assert stop.value.code == 2
    printed = capsys.readouterr().err
    lines = [line for line in printed.splitlines() if line.startswith("medrec: error")]
    assert len(lines) == 1 and lines[0].startswith("medrec: error: SafeDrug needs drug molecules")
    assert "Traceback" not in printed


def test_a_partial_molecule_gap_warns_once_with_count_and_share(tmp_path, caplog):
    folder = cohort_folder(tmp_path, smiles={"A01A": ["CCO"], "B01A": ["c1ccccc1O"], "C01A": ["CC(=O)O"]})
    dm = VisitSequenceDataModule(root=str(folder), batch_size=4)
    with caplog.at_level(logging.WARNING):
        model = SafeDrug(knowledge=dm.knowledge, embedding_dim=8)
        quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(model, datamodule=dm)
    gaps = [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()]
    assert gaps == ["SafeDrug: 1 of 4 drug(s) (25.0 %) have no parseable molecule and use a learned fallback "
                    "embedding: ['D01A']"]  # fmt: skip
    assert model.fallback_memory.shape == (1, 8)


def test_allow_missing_molecules_trains_on_fallback_embeddings(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = cohort_folder(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / "safedrug.yaml"), f"--data.init_args.root={folder}",
            "--model.init_args.allow_missing_molecules=true", *QUICK]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        train_main(args)
    assert len(list((tmp_path / "runs").rglob("last.ckpt"))) == 1
    assert sum("4 of 4 drug(s) (100.0 %)" in r.getMessage() for r in caplog.records) == 1


def _fit(model, dm, callbacks):
    quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=callbacks).fit(
        model, datamodule=dm
    )


@pytest.mark.parametrize(
    "make, controller",
    [
        (lambda k, **o: SafeDrug(knowledge=k, embedding_dim=8, **o), lambda: PIDDDIController(target_ddi=0.06)),
        (lambda k, **o: GAMENet(knowledge=k, embedding_dim=8, **o), lambda: DDIAnnealing()),
    ],
    ids=["safedrug", "gamenet"],
)
def test_ddi_controlled_fit_refuses_a_cohort_without_ddi_pairs(tmp_path, make, controller):
    smiles = {c: ["CCO"] for c in ("A01A", "B01A", "C01A", "D01A")}
    dm = VisitSequenceDataModule(root=str(cohort_folder(tmp_path, smiles=smiles, ddi=False)), batch_size=4)
    with pytest.raises(CohortError) as err:
        _fit(make(dm.knowledge), dm, [controller()])
    message = str(err.value)
    assert "has no adverse DDI pairs" in message and "drug-DDI.csv" in message and "ddi_A_final.pkl" in message
    assert SECTION in message and "--model.init_args.allow_no_ddi=true" in message
    _fit(make(dm.knowledge), dm, [])  # no DDI control: nothing to refuse
    model = make(dm.knowledge, allow_no_ddi=True)
    _fit(model, dm, [controller()])
    assert model.trainer.current_epoch == 1 and torch.isfinite(model(first_batch(dm))).all()


@pytest.mark.skipif(not (DEMO / "ADMISSIONS.csv.gz").is_file(), reason=f"MIMIC-III demo not found at {DEMO}")
def test_demo_cohort_without_molecules_is_refused_by_safedrug(tmp_path, monkeypatch):
    """The issue's case: the demo with only the shared mappings (+ RXCUI2atc4.csv): 14 drug classes,
    no SMILES, no DDI pairs. SafeDrug refuses it, naming the files; the options let it train."""
    maps = tmp_path / "maps"
    write_demo_knowledge(maps)
    for name in ("drugbank_drugs_info.csv", "drug-DDI.csv"):
        (maps / name).unlink()
    monkeypatch.delenv("MEDREC_MAPPINGS", raising=False)
    dm = VisitSequenceDataModule(root=str(DEMO), mappings=str(maps), cache_dir=str(tmp_path / "cache"), batch_size=4)
    assert dm.knowledge.num_medications == 14 and not dm.knowledge.smiles and not dm.knowledge.ddi_adj.any()
    with pytest.raises(CohortError, match="SafeDrug needs drug molecules, but none of the 14 drug"):
        _fit(SafeDrug(knowledge=dm.knowledge, embedding_dim=8), dm, [])
    model = SafeDrug(knowledge=dm.knowledge, embedding_dim=8, allow_missing_molecules=True, allow_no_ddi=True)
    _fit(model, dm, [PIDDDIController(target_ddi=0.06)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
