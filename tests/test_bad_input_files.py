"""Hardening (issue 23), "no file runs code": benchmark pickles and checkpoints from a hostile
or careless source load through restricted readers, or fail with one error naming the file."""

from __future__ import annotations

import os
import pickle
import pickletools

import dill
import numpy as np
import pytest
import torch
from test_benchmark import Voc, write_fake_benchmark

from datamodules.benchmark import read_benchmark
from datamodules.cohort import CohortError
from datamodules.errors import CheckpointError, MedRecError
from datamodules.safe_pickle import UnsafePickleError, load_checkpoint, load_pickle, loads


class Payload:
    """Unpickling this runs ``touch <marker>``: the attack the restricted readers must stop."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- the restricted unpickler ------------------------------------------------------------
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_data_and_numpy_load_unchanged(protocol):
    import collections

    data = {
        "records": [[[1, 2], [3], [4, 5]]],
        "adjacency": np.eye(3),
        "scalar": np.float32(1.5),
        "set": {"a", "b"},
        "pairs": collections.defaultdict(set, {"N02B": {"CCO"}}),
        "order": collections.OrderedDict(a=1),
    }
    out = loads(pickle.dumps(data, protocol=protocol))
    assert out["records"] == data["records"] and out["set"] == data["set"] and out["order"] == data["order"]
    assert np.array_equal(out["adjacency"], data["adjacency"]) and out["scalar"] == np.float32(1.5)
    assert out["pairs"] == data["pairs"] and out["pairs"].default_factory is set


def test_dill_vocabulary_class_stored_by_value_loads_without_its_code(tmp_path):
    marker = str(tmp_path / "ran")  # a str: the closure cell is pickled too

    class Voc:  # defined in a function: dill stores it by value, with its code
        def __init__(self, words):
            self.idx2word = dict(enumerate(words))
            self.word2idx = {w: i for i, w in self.idx2word.items()}

        def __setstate__(self, state):  # would run on load if the stored class were rebuilt
            os.system(f"touch {marker}")
            self.__dict__.update(state)

    for protocol in (0, 2, 4):
        blob = dill.dumps({"med_voc": Voc(["A01A", "B01A"])}, protocol=protocol)
        assert b"_create_type" in blob and b"_create_code" in blob  # the class travels by value
        vocab = loads(blob)["med_voc"]
        assert vocab.idx2word == {0: "A01A", 1: "B01A"} and vocab.word2idx == {"A01A": 0, "B01A": 1}
    assert not os.path.exists(marker)


def test_python37_code_object_in_a_vocabulary_does_not_stop_the_import():
    # dill 0.2/0.3 under Python 3.6/3.7 wrote a code object as _load_type('CodeType')(15 args);
    # Python >= 3.8 needs 16, so dill.load fails with "code expected at least 16 arguments, got 15"
    args = (1, 0, 1, 2, 67, b"d\x00S\x00", (None,), (), ("self",), "voc.py", "add", 1, b"", (), ())
    tuple_ops = pickle.dumps(args, protocol=2)[2:-1]
    blob = b"\x80\x02cdill._dill\n_load_type\nX\x08\x00\x00\x00CodeType\x85R" + tuple_ops + b"R."
    with pytest.raises(TypeError, match="code expected at least 16 arguments, got 15"):
        dill.loads(blob)
    assert repr(loads(blob)) == "<code not loaded>"  # read as an inert placeholder


def test_crafted_pickle_payload_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "records_final.pkl"
    path.write_bytes(pickle.dumps([Payload(marker)]))
    with pytest.raises(UnsafePickleError, match=r"records_final\.pkl: refusing to load posix\.system") as info:
        load_pickle(path)
    assert isinstance(info.value, CohortError) and isinstance(info.value, MedRecError)
    assert not marker.exists()


def test_crafted_dill_helper_payload_does_not_run(tmp_path):
    # dill's _import_module/_get_attr reach only what find_class allows, e.g. not os.system
    marker = tmp_path / "ran"
    blob = (
        b"\x80\x02cdill._dill\n_get_attr\ncdill._dill\n_import_module\nX\x02\x00\x00\x00os\x85R"
        b"X\x06\x00\x00\x00system\x86R"
        + b"X"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    pickletools.dis(blob, out=open(os.devnull, "w"))  # a well-formed pickle
    with pytest.raises(UnsafePickleError, match=r"refusing to load os\.system"):
        loads(blob)
    assert not marker.exists()


def test_crafted_records_final_pkl_does_not_run_during_fit(tmp_path):
    """The issue's case: a crafted records_final.pkl ran its payload during ``fit``."""
    from datamodules.visit_sequence import VisitSequenceDataModule

    marker = tmp_path / "ran"
    folder = write_fake_benchmark(tmp_path / "bench", [[[[0], [0], [0]]]])
    (folder / "records_final.pkl").write_bytes(pickle.dumps([[[[0], [0], [0]]], Payload(marker)]))
    dm = VisitSequenceDataModule(root=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UnsafePickleError, match=r"bench/records_final\.pkl: refusing to load posix\.system"):
        dm.prepare_data()
    assert not marker.exists()


def test_benchmark_vocabulary_by_value_imports(tmp_path):
    folder = write_fake_benchmark(tmp_path / "b", [[[[0], [0], [0, 1]]]])

    class Voc:  # by value, as the authors' __main__ class was
        def __init__(self, words):
            self.idx2word = dict(enumerate(words))
            self.word2idx = {w: i for i, w in self.idx2word.items()}

    voc = {"diag_voc": Voc(["d0", "d1"]), "pro_voc": Voc(["p0"]), "med_voc": Voc(["M00A", "M01A", "M02A"])}
    (folder / "voc_final.pkl").write_bytes(dill.dumps(voc))
    cohort = read_benchmark(folder)
    assert cohort.vocab["medication"] == ["M00A", "M01A", "M02A"] and cohort.vocab["diagnosis"] == ["d0", "d1"]


def test_benchmark_vocabulary_without_idx2word_is_a_clear_error(tmp_path):
    folder = write_fake_benchmark(tmp_path / "b", [[[[0], [0], [0]]]])
    (folder / "voc_final.pkl").write_bytes(pickle.dumps({"diag_voc": {}, "pro_voc": {}, "med_voc": {}}))
    with pytest.raises(CohortError, match=r"voc_final\.pkl: vocabulary 'diag_voc' has no idx2word dict"):
        read_benchmark(folder)
    assert Voc  # the by-reference Voc of test_benchmark still imports (covered there)


# --- checkpoints -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real medrec checkpoint (LR, 1 step) written through train.py."""
    from conftest import write_cohort

    from train import main

    folder = tmp_path_factory.mktemp("ckpt")
    cohort = write_cohort(folder / "cohort")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        main(
            [
                "fit",
                "--config=" + os.path.join(os.path.dirname(__file__), "..", "configs", "lr.yaml"),
                f"--data.init_args.root={cohort}",
                "--trainer.max_epochs=1",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                "--checkpoint.dirpath=ckpt",
            ]
        )
    finally:
        os.chdir(cwd)
    return folder / "ckpt" / "last.ckpt", cohort


def test_medrec_checkpoint_loads_with_weights_only(checkpoint):
    from lightning_modules.recommend import Recommender

    raw = load_checkpoint(checkpoint[0])
    assert raw["hyper_parameters"]["lr"] == pytest.approx(1e-3)
    assert type(raw["hyper_parameters"]["lr"]) is float  # not a jsonargparse restricted type
    rec = Recommender.from_checkpoint(str(checkpoint[0]))
    assert isinstance(rec.recommend([{"diagnoses": ["a"], "procedures": ["x"]}])["drugs"], list)


def test_crafted_checkpoint_payload_does_not_run_in_from_checkpoint(tmp_path, checkpoint):
    """The issue's case: a crafted checkpoint passed to Recommender.from_checkpoint ran its payload."""
    from lightning_modules.recommend import Recommender

    marker = tmp_path / "ran"
    crafted = torch.load(checkpoint[0], weights_only=True)
    crafted["hyper_parameters"]["lr"] = Payload(marker)
    torch.save(crafted, tmp_path / "crafted.ckpt")
    with pytest.raises(CheckpointError, match=r"crafted\.ckpt: not a readable checkpoint: refused"):
        Recommender.from_checkpoint(str(tmp_path / "crafted.ckpt"))
    assert not marker.exists()


def test_checkpoint_naming_a_foreign_class_is_refused(tmp_path, checkpoint):
    from lightning_modules.recommend import Recommender

    crafted = torch.load(checkpoint[0], weights_only=True)
    crafted["medrec_model_class"] = "antigravity.Fly"  # importing a module can run its code
    torch.save(crafted, tmp_path / "foreign.ckpt")
    with pytest.raises(CohortError, match=r"foreign\.ckpt: names model class 'antigravity\.Fly', which is not"):
        Recommender.from_checkpoint(str(tmp_path / "foreign.ckpt"))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "checkpoint file not found"),
        (b"this is a text file, not a checkpoint\n", "not a readable checkpoint"),
        ("truncated", "damaged or not a checkpoint"),
        ("folder", "a checkpoint must be a file"),
    ],
    ids=["missing", "text", "truncated", "folder"],
)
def test_unreadable_checkpoint_is_one_checkpoint_error(tmp_path, checkpoint, content, message):
    from lightning_modules.recommend import Recommender

    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        path.write_bytes(checkpoint[0].read_bytes()[:2000])
    elif content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad\.ckpt: .*{message}"):
        Recommender.from_checkpoint(str(path))


# --- the Python API's input ---------------------------------------------------------------
@pytest.mark.parametrize(
    "visits, message",
    [
        (
            [{"diagnosis": ["a"], "procedures": ["x"]}],
            r"visit 0 has unknown key 'diagnosis'; did you mean 'diagnoses'\?",
        ),
        ({"diagnoses": ["a"]}, "visits must be a list of visit dicts, got a dict"),
        ("a, x", "visits must be a list of visit dicts, got a str"),
        (["a"], "visit 0 must be a dict of codes"),
        ([{"diagnoses": None}], "visit 0 'diagnoses' must be a list of code strings, got None"),
        ([{"diagnoses": "a"}], "visit 0 'diagnoses' must be a list of code strings, got 'a'"),
        ([{"diagnoses": ["a", None]}], r"visit 0 'diagnoses' must be a list of code strings, got \['a', None\]"),
        ([{"diagnoses": ["a"], "age": "sixty"}], "visit 0 'age' must be a number or None, got 'sixty'"),
        ([{"diagnoses": ["a"], "gender": "female"}], r"visit 0 'gender' must be \['F', 'M'\] or None, got 'female'"),
    ],
    ids=["misspelt-key", "dict", "str", "visit-str", "codes-none", "codes-str", "code-none", "age-text", "gender"],
)
def test_recommend_refuses_malformed_visits(checkpoint, visits, message):
    from lightning_modules.recommend import Recommender, VisitInputError

    rec = Recommender.from_checkpoint(str(checkpoint[0]))
    with pytest.raises(VisitInputError, match=message) as info:
        rec.recommend(visits)
    assert isinstance(info.value, MedRecError)


def test_checkpoint_naming_a_loaded_non_model_class_is_refused(tmp_path, checkpoint):
    from lightning_modules.recommend import Recommender

    crafted = torch.load(checkpoint[0], weights_only=True)
    crafted["medrec_model_class"] = "subprocess.Popen"  # loaded already, but no medrec model
    torch.save(crafted, tmp_path / "popen.ckpt")
    with pytest.raises(CohortError, match=r"popen\.ckpt: names model class 'subprocess\.Popen', which is not a medrec"):
        Recommender.from_checkpoint(str(tmp_path / "popen.ckpt"))
