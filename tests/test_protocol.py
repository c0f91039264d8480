"""The protocol every model class keeps, checked on every method at once (issue 25).

One method = one main config in ``configs/`` (``lightning_modules.registry.method_configs``); each names its
model class and the DataModule whose batches it reads (visit sequences, or package graphs for DPR and NCF). Each
is built from its own config's ``model.init_args`` (``protocol_settings``: pre-training cut to one epoch) on the
tiny synthetic cohort, with its config's DDI controller, fitted for one training batch and one validation batch,
saved, and held to the contract of ``MedRecModule``:

* a training step gives a finite scalar loss whose gradients reach every trainable parameter (a model with
  nothing to optimise has no loss and a fit leaves its predictions as they were);
* evaluation gives probabilities in [0, 1] for every visit, ``(B, T, M)``, and the base logs its validation metrics;
* ``predict_step`` records name the batch's patients and visits, the drugs above the threshold and the recorded ones;
* a patient's predictions are the same batched with others as alone (padding does not leak);
* the prediction at visit t ignores the drugs of visits t and later (its target and the future) and the codes
  of later visits;
* a checkpoint loads back (``load_from_checkpoint``) into the same predictions.

A new method's config is picked up without editing this file. A model that breaks a clause for a reason that
is not a bug of the clause is listed in ``KNOWN_FAILURES`` (a strict xfail: it must keep failing).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import handmade_datamodule, quiet_trainer

import lightning_modules
from datamodules.batches import VisitDescriptions
from lightning_modules import LogisticRegression
from lightning_modules.base import MedRecModule
from lightning_modules.checkpoints import import_class
from lightning_modules.registry import all_configs, config_path, method_configs

pytestmark = [
    pytest.mark.usefixtures("single_intra_op_thread"),
    pytest.mark.filterwarnings("ignore:`LightningModule.configure_optimizers` returned `None`"),  # frequency, nearest
]

METHODS = method_configs()
MAX_WIDTH = 256  # layer widths (``*_dim`` init_args) above it are cut to it: a future wide config stays quick here
PRETRAIN_EPOCHS = 1  # pre-training stages (DPR's NCF, RAREMed's) run one epoch
# a package batch's description of each visit (its owner, patient_key, stays the same)
DESCRIPTION = sorted(VisitDescriptions.__required_keys__ - {"patient_key", "package_id"})
BATCH = 8  # patients per training, validation and evaluation batch
# Trainable parameters a correct model leaves without gradient in its first training step, and why.
IDLE_PARAMETERS = {
    "cognet": (
        ("diag_pool.score.2.bias", "proc_pool.score.2.bias"),
        "the bias of the last score layer of a softmax pooling cancels in the softmax",
    ),
    "raremed": (("output.",), "pretrain_epochs 1: the first epoch trains the pre-training heads only"),
}
# (check, method): why the method fails the check -> a strict xfail
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def cases(check: str) -> list:
    """Every method, as a parameter of the ``fitted`` fixture, marked where it is a known failure of ``check``."""
    out = []
    for name in METHODS:
        reason = KNOWN_FAILURES.get((check, name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


class Recorder(L.Callback):
    """The loss of the first training step and the gradients its optimizer step sees (automatic or manual)."""

    def __init__(self):
        self.loss, self.grads = None, None

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if self.grads is None:
            self.grads = {
                name: None if p.grad is None else p.grad.detach().clone()
                for name, p in module.named_parameters()
                if p.requires_grad
            }

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.loss = outputs.get("loss") if isinstance(outputs, dict) else outputs


@dataclass
class Fitted:
    """A method after its one-batch fit: model, data, what the fit recorded, its checkpoint."""

    name: str
    model: MedRecModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer
    recorder: Recorder
    samples: list  # the first BATCH test patients, as the test loader's dataset gives them
    batch: dict  # those patients collated by the test loader's collator
    before: torch.Tensor  # their probabilities before the fit
    checkpoint: Path

    def collate(self, samples: list) -> dict:
        return self.datamodule.test_dataloader().collate_fn(samples)


def protocol_settings(init_args: dict) -> dict:
    """The config's ``model.init_args`` with widths capped at MAX_WIDTH and pre-training cut to PRETRAIN_EPOCHS
    (today's configs are all narrower: they run as configured but for pre-training)."""
    out = dict(init_args)
    for name, value in init_args.items():
        if name.endswith("_dim") and isinstance(value, int):
            out[name] = min(value, MAX_WIDTH)
        elif name == "pretrain_epochs":
            out[name] = min(value, PRETRAIN_EPOCHS)
    return out


def instantiate(section: dict, **extra):
    return import_class(section["class_path"])(**{**section.get("init_args", {}), **extra})


def probabilities(model: MedRecModule, batch: dict) -> torch.Tensor:
    """Eval-mode probabilities of ``batch``; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = model.predict_probabilities(batch)
    model.train(was_training)
    return probs


@pytest.fixture(scope="module")
def fitted(request, tiny_cohort_dir, tmp_path_factory) -> Fitted:
    name = request.param
    config = yaml.safe_load(config_path(name).read_text())
    datamodule = instantiate(config["data"], root=str(tiny_cohort_dir), batch_size=BATCH, eval_batch_size=BATCH)
    datamodule.setup("fit")
    init_args = protocol_settings(config["model"].get("init_args", {}))
    L.seed_everything(0, verbose=False)
    model = instantiate({**config["model"], "init_args": init_args}, knowledge=datamodule.knowledge)
    loader = datamodule.test_dataloader()
    samples = [loader.dataset[i] for i in range(BATCH)]
    batch = loader.collate_fn(samples)
    assert batch["visit_mask"].sum(1).unique().numel() > 1, "the evaluation batch must pad some patients"
    before = probabilities(model, batch)
    recorder = Recorder()
    callbacks = [recorder]
    if config.get("ddi_controller"):  # the config's DDI controller drives the loss as in a real fit
        callbacks.append(instantiate(config["ddi_controller"]))
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks
    )
    trainer.fit(model, datamodule=datamodule)
    checkpoint = tmp_path_factory.mktemp(f"protocol-{name}") / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    return Fitted(name, model, datamodule, trainer, recorder, samples, batch, before, checkpoint)


def test_every_model_class_is_a_method_with_a_main_config():
    """The protocol runs the main configs; variants reuse their parent's class, and every exported model
    class has a main config (so none escapes the protocol)."""
    classes = {yaml.safe_load(config_path(name).read_text())["model"]["class_path"] for name in all_configs()}
    covered = {import_class(yaml.safe_load(config_path(name).read_text())["model"]["class_path"]) for name in METHODS}
    assert {import_class(path) for path in classes} == covered
    exported = {getattr(lightning_modules, name) for name in lightning_modules.__all__} - {MedRecModule}
    assert exported <= covered, sorted(cls.__name__ for cls in exported - covered)
    assert len(METHODS) == len(covered), "two main configs of one class: one of them is a variant"


@pytest.mark.parametrize("fitted", cases("training"), indirect=True)
def test_a_training_step_gives_a_finite_loss_whose_gradients_reach_the_parameters(fitted):
    model, recorder = fitted.model, fitted.recorder
    after = probabilities(model, fitted.batch)
    if model.configure_optimizers() is None:
        # nothing to optimise (frequency, nearest): no loss, and a fit leaves the predictions as they were
        assert recorder.loss is None and recorder.grads is None
        torch.testing.assert_close(after, fitted.before, rtol=0, atol=0)
        return
    loss = recorder.loss
    assert torch.is_tensor(loss) and loss.dim() == 0 and torch.isfinite(loss), loss
    idle, _ = IDLE_PARAMETERS.get(fitted.name, ((), ""))
    missing = [n for n, g in recorder.grads.items() if g is None and not n.startswith(idle)]
    assert not missing, f"trainable parameters outside the loss's graph: {missing}"
    nonfinite = [n for n, g in recorder.grads.items() if g is not None and not torch.isfinite(g).all()]
    assert not nonfinite, nonfinite
    dead = [n for n, g in recorder.grads.items() if g is not None and not g.any() and not n.startswith(idle)]
    assert not dead, f"trainable parameters with zero gradient: {dead}"
    assert not torch.equal(after, fitted.before), "the optimizer step left the predictions unchanged"


@pytest.mark.parametrize("fitted", cases("evaluation"), indirect=True)
def test_evaluation_gives_probabilities_of_every_visit_and_the_base_metrics(fitted):
    batch, model = fitted.batch, fitted.model
    probs = probabilities(model, batch)
    assert probs.shape == (*batch["visit_mask"].shape, model.num_medications)
    real = probs[batch["visit_mask"]]
    assert torch.isfinite(real).all() and real.min() >= 0.0 and real.max() <= 1.0, (real.min(), real.max())
    logged = {k: float(v) for k, v in fitted.trainer.callback_metrics.items() if k.startswith("val_")}
    expected = {f"val_{name}" for name in model.val_metrics.keys(keep_base=True)}
    assert {"val_jaccard", "val_f1", "val_prauc", "val_ddi_rate", "val_avg_drugs"} <= expected <= set(logged), logged
    for name in expected - {"val_avg_drugs"}:
        assert 0.0 <= logged[name] <= 1.0, (name, logged[name])
    assert 0.0 <= logged["val_avg_drugs"] <= model.num_medications


@pytest.mark.parametrize("fitted", cases("predict"), indirect=True)
def test_predict_records_name_the_batch_visits_and_their_drugs(fitted):
    batch, model = fitted.batch, fitted.model
    probs = probabilities(model, batch)
    model.eval()
    with torch.no_grad():
        records = model.predict_step(batch, 0)
    cohort, codes = fitted.datamodule.cohort, model.knowledge.vocab["medication"]
    patients = fitted.datamodule.splits["test"][:BATCH]
    visits = cohort.visits.set_index("patient_id").loc[patients]
    assert [(r["patient_id"], r["visit_id"]) for r in records] == list(zip(visits.index, visits["visit_id"]))
    assert len(records) == int(batch["visit_mask"].sum())
    places = batch["visit_mask"].nonzero().tolist()  # (b, t) of every real visit, row-major
    for record, (b, t), recorded in zip(records, places, visits["medications"]):
        chosen = (probs[b, t] >= model.threshold).nonzero().flatten()
        best_first = chosen[torch.argsort(probs[b, t, chosen], descending=True, stable=True)]
        assert record["drugs"] == [codes[d] for d in best_first], record
        assert record["probabilities"] == [round(float(probs[b, t, d]), 4) for d in best_first]
        assert record["recorded_drugs"] == [codes[d] for d in sorted(set(recorded))]


def assert_batch_invariant(model: MedRecModule, samples: list, collate) -> None:
    """Each patient of ``samples`` collated alone gets the probabilities it gets collated with all of them."""
    together = probabilities(model, collate(samples))
    for b, sample in enumerate(samples):
        alone = collate([sample])
        n = int(alone["visit_mask"].sum())
        torch.testing.assert_close(
            probabilities(model, alone)[0, :n], together[b, :n], atol=1e-5, rtol=1e-5, msg=f"patient {b}"
        )


@pytest.mark.parametrize("fitted", cases("batch_invariance"), indirect=True)
def test_a_patient_alone_gets_the_predictions_it_gets_in_a_batch(fitted):
    assert_batch_invariant(fitted.model, fitted.samples, fitted.collate)


def change_from(batch: dict, b: int, t: int, knowledge) -> dict:
    """``batch`` with patient ``b``'s drugs of visits ``t`` and later and codes of visits after ``t`` changed.

    The multi-hot targets are flipped and the diagnosis and procedure codes moved to the next index; in a
    package batch (per-visit rows, row-major over ``visit_mask``) the true packages (and their ids) and the
    descriptions are swapped for other visits'."""
    changed = copy.deepcopy(batch)
    n = int(batch["visit_mask"][b].sum())
    changed["medications"][b, t:n] = 1 - batch["medications"][b, t:n]
    if "package" in batch:
        first = int(batch["visit_mask"][:b].sum())
        rows = torch.arange(first + t, first + n)
        other = (rows + n) % len(batch["package"])
        for key in ("package", "package_id"):
            changed[key][rows] = batch[key][other]
        for key in DESCRIPTION:  # the inputs, after visit t only
            changed[key][rows[1:]] = batch[key][other[1:]]
    else:
        sizes = {"diagnoses": knowledge.num_diagnoses, "procedures": knowledge.num_procedures}
        for key, size in sizes.items():
            changed[key][b, t + 1 : n] = (batch[key][b, t + 1 : n] + 1) % size
    return changed


def assert_causal(model: MedRecModule, batch: dict) -> None:
    """Changing the drugs of visit 1 and later and the codes of visit 2 and later of the longest patient changes
    neither that patient's predictions at visits 0 and 1 nor any other patient's."""
    lengths = batch["visit_mask"].sum(1)
    b, t = int(lengths.argmax()), 1
    assert int(lengths[b]) >= 3, "the check needs a patient with visits after the changed one"
    before = probabilities(model, batch)
    after = probabilities(model, change_from(batch, b, t, model.knowledge))
    torch.testing.assert_close(after[b, : t + 1], before[b, : t + 1], atol=1e-6, rtol=0)
    others = torch.arange(len(lengths)) != b
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fitted", cases("causality"), indirect=True)
def test_the_prediction_at_a_visit_ignores_its_own_drugs_and_later_visits(fitted):
    assert_causal(fitted.model, fitted.batch)


class LeakyRegression(LogisticRegression):
    """Logistic regression that reads the targets (``leak="target"``) or the batch's padding (``"padding"``)."""

    def __init__(self, *args, leak: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.leak = leak

    def forward(self, batch: dict) -> torch.Tensor:
        logits = super().forward(batch)
        if self.leak == "target":
            return logits + batch["medications"]
        return logits + batch["visit_mask"].float().mean()


def test_the_invariance_and_causality_checks_catch_a_leaking_model(tmp_path):
    data = handmade_datamodule(tmp_path / "c", n_patients=15)  # test patients of 2 and 3 visits
    loader = data.test_dataloader()
    samples = [loader.dataset[i] for i in range(len(loader.dataset))]
    batch = loader.collate_fn(samples)
    torch.manual_seed(0)
    honest = LogisticRegression(knowledge=data.knowledge)
    assert_batch_invariant(honest, samples, loader.collate_fn)
    assert_causal(honest, batch)
    assert_batch_invariant(LeakyRegression(knowledge=data.knowledge, leak="target"), samples, loader.collate_fn)
    with pytest.raises(AssertionError):
        assert_causal(LeakyRegression(knowledge=data.knowledge, leak="target"), batch)
    with pytest.raises(AssertionError, match="patient"):
        assert_batch_invariant(LeakyRegression(knowledge=data.knowledge, leak="padding"), samples, loader.collate_fn)


@pytest.mark.parametrize("fitted", cases("checkpoint"), indirect=True)
def test_a_checkpoint_loads_back_into_the_same_predictions(fitted):
    loaded = type(fitted.model).load_from_checkpoint(fitted.checkpoint, knowledge=fitted.datamodule.knowledge)
    assert type(loaded) is type(fitted.model)
    saved = fitted.model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    torch.testing.assert_close(
        probabilities(loaded, fitted.batch), probabilities(fitted.model, fitted.batch), atol=0, rtol=0
    )
