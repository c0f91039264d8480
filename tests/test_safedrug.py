"""SafeDrug: encoders, masks, loss, the PID DDI controller and what training with it achieves."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import first_batch, fit_and_test, quiet_trainer, write_cohort

from callbacks import PIDDDIController
from datamodules.cohort import CohortError
from datamodules.errors import OptionError
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import LogisticRegression, Nearest, SafeDrug
from lightning_modules.metrics import batch_pair_counts


@pytest.fixture()
def data(tiny_datamodule):
    tiny_datamodule.setup("fit")
    return tiny_datamodule


# --- the model -------------------------------------------------------------------------
def test_every_visit_is_predicted_causally(data):
    torch.manual_seed(0)
    model = SafeDrug(knowledge=data.knowledge).eval()
    batch = first_batch(data)
    logits = model(batch)
    B, T = batch["visit_mask"].shape
    assert logits.shape == (B, T, data.knowledge.num_medications)
    assert (logits[~batch["visit_mask"]] == 0).all()
    b = int(torch.argmax(batch["lengths"]))
    last = int(batch["lengths"][b]) - 1
    assert last >= 1
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    changed["diagnoses"][b, last] = (changed["diagnoses"][b, last] + 1) % data.knowledge.num_diagnoses
    changed["medications"][b, : last + 1] = 1 - changed["medications"][b, : last + 1]  # targets are not inputs
    after = model(changed)
    torch.testing.assert_close(after[b, :last], logits[b, :last])
    assert not torch.allclose(after[b, last], logits[b, last])


def test_variants_keep_only_their_encoders(data):
    k = data.knowledge
    dual, glob = SafeDrug(knowledge=k), SafeDrug(knowledge=k, encoders="global")
    local, dense = SafeDrug(knowledge=k, encoders="local"), SafeDrug(knowledge=k, use_mask=False)
    assert hasattr(glob, "molecule_encoder") and not hasattr(glob, "local_weight")
    assert hasattr(local, "local_weight") and not hasattr(local, "molecule_encoder")
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in [("d", dual), ("g", glob), ("l", local)]}
    patient = sum(p.numel() for n, p in dual.named_parameters() if n.split(".")[0] in _PATIENT_PARTS)
    assert count["d"] == count["g"] + count["l"] - patient  # dual = patient query + global + local
    H = dual.substructure_mask
    assert 0.005 < H.mean() < 0.05 and (H.sum(1) >= 1).all()
    assert dense.substructure_mask.shape == H.shape and bool((dense.substructure_mask == 1).all())
    batch = first_batch(data)
    for model in (glob, local, dense):
        assert model(batch).shape == dual(batch).shape
    with pytest.raises(ValueError, match="encoders must be"):
        SafeDrug(knowledge=k, encoders="both")


_PATIENT_PARTS = {"diag_embedding", "proc_embedding", "diag_gru", "proc_gru", "query"}


def test_local_weights_outside_the_mask_get_no_gradient(data):
    model = SafeDrug(knowledge=data.knowledge, encoders="local")
    batch = first_batch(data)
    model.compute_loss(model(batch), batch)["loss"].backward()
    grad, H = model.local_weight.grad, model.substructure_mask
    assert (grad[H == 0] == 0).all()
    assert (grad[H == 1] != 0).float().mean() > 0.9


def test_mpnn_runs_once_over_all_molecules_and_is_trained(data):
    model = SafeDrug(knowledge=data.knowledge)
    memory = model.drug_memory()
    assert memory.shape == (data.knowledge.num_medications, 64)
    assert model.num_molecules == len(model.molecule_drug) > data.knowledge.num_medications
    batch = first_batch(data)
    model.compute_loss(model(batch), batch)["loss"].backward()
    assert model.molecule_encoder.embedding.weight.grad.abs().sum() > 0
    # evaluation reuses E_g until a weight changes in place
    model.eval()
    with torch.no_grad():
        first = model._current_memory()
        assert model._current_memory() is first
        model.molecule_encoder.layers[0].linear.bias.add_(1.0)
        assert not torch.equal(model._current_memory(), first)


def test_loss_is_beta_weighted_mix_of_accuracy_and_ddi(data):
    model = SafeDrug(knowledge=data.knowledge)
    batch = first_batch(data)
    logits = model(batch)
    one, zero, half = (model.compute_loss(logits, batch, beta) for beta in (1.0, 0.0, 0.5))
    torch.testing.assert_close(one["loss"], 0.95 * one["bce"] + 0.05 * one["margin"])
    torch.testing.assert_close(zero["loss"], zero["ddi"])
    torch.testing.assert_close(half["loss"], 0.5 * one["loss"] + 0.5 * one["ddi"])
    # L_ddi = 0.0005 * mean over real visits of sum_ij A_ij p_i p_j
    p = torch.sigmoid(logits.detach())[batch["visit_mask"]]
    A = model.ddi_adj
    by_hand = sum(float(A[i, j] * v[i] * v[j]) for v in p for i, j in A.nonzero().tolist()) / len(p)
    assert one["ddi"].item() == pytest.approx(0.0005 * by_hand, rel=1e-4)


def test_batch_pair_counts_by_hand():
    adj = torch.zeros(4, 4)
    adj[0, 3] = adj[3, 0] = 1.0
    probs = torch.tensor([[[0.9, 0.1, 0.6, 0.7], [0.9, 0.9, 0.9, 0.9]], [[0.6, 0.0, 0.0, 0.6], [1.0, 1.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    ddi, total = batch_pair_counts(probs, mask, adj)
    # visit sets {0,2,3} (3 pairs, 1 adverse), {0,1,2,3} (6, 1), {0,3} (1, 1); padding ignored
    assert (ddi.item(), total.item()) == (3, 10)


def test_drugs_without_molecules_use_a_learned_fallback_or_fail(tmp_path):
    dm = VisitSequenceDataModule(root=str(write_cohort(tmp_path / "c", n_patients=12)), batch_size=4)
    assert not dm.knowledge.smiles.get("A01A")  # the handmade cohort has no molecules at all
    model = SafeDrug(knowledge=dm.knowledge, embedding_dim=8, allow_missing_molecules=True)
    assert model.fallback_memory.shape == (4, 8)
    assert model.substructure_mask.tolist() == torch.eye(4).tolist()  # one placeholder per drug
    torch.testing.assert_close(model.drug_memory(), model.fallback_memory)
    dm.setup("fit")
    assert model(first_batch(dm)).shape[-1] == 4
    with pytest.raises(CohortError, match=r"SafeDrug needs a molecule for every drug.*'A01A'"):
        SafeDrug(knowledge=dm.knowledge, missing_molecules="error")


# --- the controller --------------------------------------------------------------------
def test_controller_follows_paper_eq_19():
    pid = PIDDDIController(target_ddi=0.06, kp=0.05)
    assert pid.step(0.03) == 1.0  # below target
    assert pid.step(0.06) == 1.0  # at target
    assert pid.step(0.085) == pytest.approx(0.5)  # 1 - 0.025 / 0.05
    assert pid.step(0.20) == 0.0  # clipped at 0, not negative (the reference's min(0, ...) typo)
    assert pid.step(0.05) == 1.0  # recovers at once without I/D terms
    assert pid.update(torch.tensor(2.0), torch.tensor(20.0)) == pytest.approx(1 - 0.04 / 0.05)
    assert pid.update(0, 0) == 1.0  # no predicted pair: rate 0


def test_controller_integral_and_derivative_terms():
    pid = PIDDDIController(target_ddi=0.06, kp=0.05, ki=1.0, integral_limit=0.1)
    assert pid.step(0.07) == pytest.approx(1 - (0.01 + 0.01) / 0.05)
    assert pid.step(0.07) == pytest.approx(1 - (0.01 + 0.02) / 0.05)  # excess accumulates
    assert pid.step(0.05) == pytest.approx(1 - (-0.01 + 0.01) / 0.05)  # integral keeps β below 1
    assert pid.integral == pytest.approx(0.01)
    pid = PIDDDIController(target_ddi=0.06, kp=0.05, kd=1.0)
    pid.step(0.06)
    assert pid.step(0.07) == pytest.approx(1 - (0.01 + 0.01) / 0.05)  # rising rate brakes harder
    with pytest.raises(ValueError, match="kp must be > 0"):
        PIDDDIController(kp=0)


def test_controller_state_round_trip():
    pid = PIDDDIController(ki=0.5)
    for rate in (0.1, 0.08, 0.07):
        pid.step(rate)
    restored = PIDDDIController(ki=0.5)
    restored.load_state_dict(pid.state_dict())
    assert restored.state_dict() == pid.state_dict()
    assert restored.step(0.09) == pid.step(0.09)


def test_controller_gives_every_rank_the_same_beta():
    class TwoRanks:  # what a DDP strategy's all-reduce does with both ranks' counts
        def __init__(self, other):
            self.other = other

        def reduce(self, tensor, reduce_op):
            assert reduce_op == "sum"
            return tensor + self.other

    ranks = [(1.0, 40.0), (9.0, 60.0)]  # rates 0.025 and 0.15; together 0.1
    betas = []
    for mine, theirs in (ranks, ranks[::-1]):
        pid = PIDDDIController(target_ddi=0.06, kp=0.05)
        pid._strategy = TwoRanks(torch.tensor(theirs, dtype=torch.float64))
        betas.append(pid.update(*mine))
    assert betas[0] == betas[1] == pytest.approx(1 - 0.04 / 0.05)


def test_controller_in_a_fit_logs_and_checkpoints_its_state(data, tmp_path):
    pid = PIDDDIController(target_ddi=0.0, kp=0.05)
    model = SafeDrug(knowledge=data.knowledge, embedding_dim=16)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[pid])
    trainer.fit(model, datamodule=data)
    assert pid.steps == 3 and model.ddi_controller is None  # detached after the fit
    assert trainer.callback_metrics["pid_beta_step"].item() == pytest.approx(pid.beta)  # last step
    assert "pid_ddi_rate_epoch" in trainer.callback_metrics and "train_ddi_epoch" in trainer.callback_metrics
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=False)["callbacks"][pid.state_key]
    assert stored == pid.state_dict() and stored["steps"] == 3

    resumed = PIDDDIController(target_ddi=0.0, kp=0.05)
    again = quiet_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[resumed])
    again.fit(SafeDrug(knowledge=data.knowledge, embedding_dim=16), datamodule=data, ckpt_path=str(path))
    assert resumed.steps == 6


def test_controller_refuses_a_module_without_ddi_control(data):
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[PIDDDIController()])
    with pytest.raises(OptionError, match="--ddi_controller PIDDDIController steers a module with a `ddi_controller`"):
        trainer.fit(LogisticRegression(knowledge=data.knowledge), datamodule=data)


# --- learning -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    dm = VisitSequenceDataModule(synthetic_patients=500, synthetic_seed=7, batch_size=16)
    dm.setup("fit")
    return dm


def fit_safedrug(dm, gamma):
    L.seed_everything(0)
    model = SafeDrug(knowledge=dm.knowledge, lr=2e-3, ddi_loss_scale=0.05, normalize=True)
    return fit_and_test(model, dm, epochs=10, callbacks=[PIDDDIController(target_ddi=gamma, kp=0.05)])


@pytest.fixture(scope="module")
def loose(synthetic):
    return fit_safedrug(synthetic, gamma=0.08)  # above what the model predicts: β stays 1


def test_short_fit_on_synthetic_cohort_beats_nearest(synthetic, loose):
    nearest = fit_and_test(Nearest(knowledge=synthetic.knowledge), synthetic, epochs=1)
    assert loose["test_jaccard"] > nearest["test_jaccard"] + 0.08
    assert loose["test_prauc"] > nearest["test_prauc"] + 0.05


def test_lower_target_gives_lower_output_ddi(synthetic, loose):
    strict = fit_safedrug(synthetic, gamma=0.0)
    assert strict["test_ddi_rate"] < 0.5 * loose["test_ddi_rate"]
    assert strict["test_jaccard"] > 0.4  # safer, still far from the frequent-drug floor (≈ 0.3)
