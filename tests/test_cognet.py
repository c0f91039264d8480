"""COGNet: shapes, the copy distribution, causality, batching, beam search, options, learning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import batch_tensors, first_batch, fit_and_test, handmade_datamodule

from datamodules.errors import OptionError
from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import COGNet, Nearest
from lightning_modules.cognet import drug_ranks
from train import make_cli

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cognet.yaml")


@pytest.fixture()
def data(tmp_path):
    return handmade_datamodule(tmp_path / "c")


def small_model(knowledge, **kwargs):
    torch.manual_seed(0)
    return COGNet(knowledge=knowledge, embedding_dim=8, encoder_ff_dim=16, decoder_ff_dim=16, **kwargs)


def subset(batch: dict, rows: list[int]) -> dict:
    """The patients ``rows`` of a batch, trimmed to their own longest visit sequence."""
    steps = int(batch["lengths"][rows].max())
    return {k: v[rows][:, :steps] if v.dim() > 1 else v[rows] for k, v in batch_tensors(batch).items()}


def earlier_drugs(batch: dict) -> torch.Tensor:
    """(N, M) union of the drug sets of each real visit's earlier visits."""
    history = batch["medications"].cumsum(1) - batch["medications"]
    return history[batch["visit_mask"]] > 0


# --- model -------------------------------------------------------------------------------
def test_shapes_and_token_distributions_sum_to_one(data):
    batch = first_batch(data)
    model = small_model(data.knowledge)
    probs, targets, target_mask = model.teacher_forced(batch)
    visits = int(batch["visit_mask"].sum())
    longest = int(batch["medications"].sum(-1).max())
    assert probs.shape == (visits, longest + 1, 5)  # 4 drugs and END
    torch.testing.assert_close(probs.sum(-1), torch.ones(visits, longest + 1))
    # targets: the visit's drugs then END, nothing past it
    assert (targets[target_mask] == 4).sum() == visits
    assert target_mask.sum() == batch["medications"].sum() + visits
    model.eval()
    scores = model.predict_probabilities(batch)
    assert scores.shape == (*batch["visit_mask"].shape, 4)
    assert model(batch).shape == scores.shape
    assert (scores[~batch["visit_mask"]] == 0).all()


def test_copy_distribution_sums_to_one_and_copies_only_drugs_of_earlier_visits(data):
    batch = first_batch(data)
    model = small_model(data.knowledge).eval()
    encoded = model.encode(batch)
    hidden = torch.randn(encoded.visits, 3, 8)
    copied = model.copy_distribution(hidden, encoded)
    earlier = earlier_drugs(batch)
    assert torch.equal(encoded.has_history, earlier.any(-1))
    assert encoded.has_history.any() and not encoded.has_history.all()
    sums = copied.sum(-1)
    torch.testing.assert_close(sums[encoded.has_history], torch.ones_like(sums[encoded.has_history]))
    assert (copied[~encoded.has_history] == 0).all()
    assert (copied[..., 4] == 0).all()  # END is never copied
    outside = ~earlier.unsqueeze(1).expand(-1, 3, -1)
    assert (copied[..., :4][outside] == 0).all()
    assert (copied[..., :4][~outside] > 0).all()  # every earlier drug can be copied


def test_copy_weights_each_earlier_visit_by_its_visit_score(data):
    """P_c(m) = Σ_k c_j(k) q_k / Σ c q: with equal drug scores (zero W_c) a drug's share is the
    visit scores of the earlier visits it was prescribed in, over their drug counts."""
    batch = first_batch(data)
    model = small_model(data.knowledge).eval()
    with torch.no_grad():
        model.copy_query.weight.zero_()
        model.copy_query.bias.zero_()
    encoded = model.encode(batch)
    copied = model.copy_distribution(torch.randn(encoded.visits, 1, 8), encoded)[:, 0, :4]
    weights = encoded.copy_log_weight.exp()  # c_j(k), zero off the copyable keys
    expected = torch.zeros(encoded.visits, 5).scatter_add_(-1, encoded.copy_drugs, weights)[:, :4]
    expected = expected / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    torch.testing.assert_close(copied, expected)
    history = encoded.has_history
    visit_scores = encoded.copy_log_weight.exp().view(encoded.visits, batch["visit_mask"].shape[1], -1).amax(-1)
    torch.testing.assert_close(visit_scores[history].sum(-1), torch.ones(int(history.sum())))


def test_prediction_at_t_ignores_later_visits(data):
    batch = first_batch(data)
    model = small_model(data.knowledge).eval()
    row = int(batch["lengths"].argmax())
    changed = {k: v.clone() for k, v in batch_tensors(batch).items()}
    changed["medications"][row, -1] = 1 - changed["medications"][row, -1]
    changed["diagnoses"][row, -1] = (changed["diagnoses"][row, -1] + 1) % 3
    last = int(batch["lengths"][row]) - 1
    before, after = model.predict_probabilities(batch), model.predict_probabilities(changed)
    torch.testing.assert_close(before[row, :last], after[row, :last])
    probs, _, _ = model.teacher_forced(batch)
    probs_changed, _, _ = model.teacher_forced(changed)
    keep = torch.ones(len(probs), dtype=torch.bool)
    keep[int(batch["visit_mask"][: row + 1].sum()) - 1] = False  # the changed visit itself
    width = min(probs.shape[1], probs_changed.shape[1])  # the changed set may widen the padded sequences
    torch.testing.assert_close(probs[keep, :width], probs_changed[keep, :width])


def test_batched_decoding_equals_one_patient_at_a_time(data):
    batch = first_batch(data)
    model = small_model(data.knowledge).eval()
    probs, _, target_mask = model.teacher_forced(batch)
    scores = model.predict_probabilities(batch)
    start = 0
    for row in range(len(batch["lengths"])):
        alone = subset(batch, [row])
        p, _, m = model.teacher_forced(alone)
        n, width = p.shape[:2]
        torch.testing.assert_close(p[m], probs[start : start + n, :width][m], rtol=1e-4, atol=1e-5)
        assert not target_mask[start : start + n, width:].any()
        torch.testing.assert_close(model.predict_probabilities(alone)[0], scores[row, : alone["lengths"][0]])
        start += n


# --- beam search ---------------------------------------------------------------------------
def rig(model, drug_bias: dict[int, float], end_bias: float = 0.0):
    """Make generation decide (huge output biases, the gate fully on generation)."""
    with torch.no_grad():
        model.generate.weight.zero_()
        model.generate.bias.zero_()
        for drug, bias in drug_bias.items():
            model.generate.bias[drug] = bias
        model.generate.bias[4] = end_bias
        model.gate.weight.zero_()
        model.gate.bias.fill_(30.0)


def test_beam_search_never_repeats_a_drug_and_stops_at_end(data):
    batch = first_batch(data)
    model = small_model(data.knowledge).eval()
    # the rigged distribution ignores the prefix: 2 first, then 0 (2 again is barred), then END
    rig(model, {2: 20.0, 0: 10.0}, end_bias=5.0)
    encoded = model.encode(batch)
    result = model.beam_search(encoded, 1)
    assert result.tokens.tolist() == [[2, 0, 4]] * encoded.visits  # stopped at END
    assert result.drugs.tolist() == [[True, False, True, False]] * encoded.visits
    assert ((result.ranking >= 0.5) == result.drugs).all()
    # log P: 2 then 0 then END costs ~ -25, END at once ~ -15: a wider beam finds the empty set,
    # and the beam that ended stays ended (END only) while the others run on
    wide = model.beam_search(encoded, 3)
    assert (wide.tokens == 4).all() and not wide.drugs.any() and wide.tokens.shape[1] > 1
    assert (wide.log_prob > result.log_prob + 5).all()
    assert (wide.ranking < 0.5).all()


def test_beam_search_sets_are_sets_and_max_drugs_caps_them(data):
    batch = first_batch(data)
    model = small_model(data.knowledge, max_drugs=2).eval()
    rig(model, {0: 9.0, 1: 8.0, 2: 7.0, 3: 6.0}, end_bias=-20.0)
    result = model.beam_search(model.encode(batch), 4)
    assert (result.drugs.sum(-1) == 2).all() and result.drugs[:, :2].all()
    drugs = result.tokens[result.tokens < 4].view(len(result.tokens), -1)
    assert all(len(set(row)) == len(row) for row in drugs.tolist())


def greedy(model, encoded) -> torch.Tensor:
    """A plain greedy decoder, one visit at a time: the most probable unused token until END."""
    sets = torch.zeros(encoded.visits, 4, dtype=torch.bool)
    for n in range(encoded.visits):
        one = type(encoded)(**{k: v[n : n + 1] if k != "memory" else v for k, v in vars(encoded).items()})
        tokens = [model.start_token]
        while len(tokens) <= model.hparams.max_drugs:
            probs = model.token_probabilities(one, torch.tensor([[tokens]]), last_only=True)[0, 0, 0]
            probs[tokens[1:]] = -1.0
            token = int(probs.argmax())
            if token == model.end_token:
                break
            tokens.append(token)
            sets[n, token] = True
    return sets


def test_beam_size_one_is_greedy_decoding(data):
    batch = first_batch(data)
    model = small_model(data.knowledge).eval()
    with torch.no_grad():  # an untrained model says END first; favour drugs so sets are not empty
        model.generate.bias[:4] += 0.5
    encoded = model.encode(batch)
    expected = greedy(model, encoded)
    assert expected.any() and not expected.all()
    assert torch.equal(model.beam_search(encoded, 1).drugs, expected)
    wide = model.beam_search(encoded, 4)
    assert (wide.log_prob >= model.beam_search(encoded, 1).log_prob - 1e-5).all()  # a wider beam never scores lower


def test_validation_decodes_with_val_beam_size(data, monkeypatch):
    model = small_model(data.knowledge, beam_size=3, val_beam_size=2).eval()
    seen = []
    original = COGNet.beam_search
    monkeypatch.setattr(COGNet, "beam_search", lambda self, enc, k: seen.append(k) or original(self, enc, k))
    model.predict_probabilities(first_batch(data))
    assert seen == [3]  # outside validation: beam_size


def test_beam_size_can_change_at_test_time_from_a_checkpoint(tiny_cohort_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--config", CONFIG, f"--data.init_args.root={tiny_cohort_dir}", "--trainer.enable_progress_bar=false"]
    fit = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    make_cli(["fit", *common, *fit, "--checkpoint.dirpath=ckpt", "--model.init_args.embedding_dim=16"])
    tested = make_cli(["test", *common, "--ckpt_path=ckpt/last.ckpt", "--model.init_args.beam_size=2"])
    assert tested.model.hparams.beam_size == 2 and tested.model.hparams.embedding_dim == 16


# --- options and data ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"threshold": 0.3}, "threshold must stay 0.5"),
        ({"margin_weight": 0.1}, "margin_weight must be 0"),
        ({"drug_order": "random"}, "drug_order must be one of"),
        ({"beam_size": 0}, "beam_size must be >= 1"),
        ({"val_beam_size": 0}, "val_beam_size must be >= 1"),
        ({"max_drugs": 0}, "max_drugs must be >= 1"),
        ({"heads": 3}, "multiple of heads"),
    ],
)
def test_bad_options_are_refused(data, option, match):
    with pytest.raises(OptionError, match=match):
        small_model(data.knowledge, **option)


def test_drug_order_follows_training_frequency(data):
    assert drug_ranks(np.array([5.0, 1.0, 9.0, 1.0]), "rare_first").tolist() == [2, 0, 3, 1]
    assert drug_ranks(np.array([5.0, 1.0, 9.0, 1.0]), "frequent_first").tolist() == [1, 2, 0, 3]
    assert drug_ranks(np.array([5.0, 1.0, 9.0, 1.0]), "index").tolist() == [0, 1, 2, 3]
    model = small_model(data.knowledge)
    model.drug_rank.copy_(torch.tensor([2, 0, 3, 1]))
    drugs, real = model.drug_sequences(torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    assert drugs[0].tolist() == [1, 0, 2] and real.tolist() == [[True] * 3, [True, False, False]]
    assert drugs[1, 0] == 2


# --- learning -------------------------------------------------------------------------------
def test_short_fit_on_synthetic_cohort_beats_nearest():
    dm = VisitSequenceDataModule(synthetic_patients=400, synthetic_seed=5, batch_size=16)
    nearest = fit_and_test(Nearest(knowledge=dm.knowledge), dm, 1)
    torch.manual_seed(0)
    model = COGNet(knowledge=dm.knowledge, encoder_ff_dim=128, lr=5e-3)
    cognet = fit_and_test(model, dm, 8)
    counts = np.zeros(dm.knowledge.num_medications)
    for sample in dm.dataset("train").samples:
        for drugs in sample["medications"]:
            counts[drugs] += 1
    assert model.drug_rank.tolist() == drug_ranks(counts, "rare_first").tolist()  # set from the training split
    assert cognet["test_jaccard"] > nearest["test_jaccard"] + 0.06, (cognet, nearest)
    assert cognet["test_prauc"] > nearest["test_prauc"] + 0.03
