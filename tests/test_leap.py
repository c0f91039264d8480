"""LEAP: target sequences, greedy decoding by hand (stops at END, never repeats), learning, options."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_tensors, first_batch, fit_and_test, handmade_datamodule

from datamodules.visit_sequence import VisitSequenceDataModule
from lightning_modules import LEAP, DrugFrequency


@pytest.fixture()
def data(tmp_path):
    return handmade_datamodule(tmp_path / "c")


def test_targets_are_the_drugs_in_vocabulary_order_then_end(data):
    model = LEAP(knowledge=data.knowledge, embedding_dim=8)
    tokens, valid = model.target_sequences(torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    end = model.end_token
    assert end == 5 and model.start_token == 4
    assert tokens.tolist() == [[1, 3, end], [end, end, end]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_teacher_forced_logits_cover_every_real_visit(data):
    torch.manual_seed(0)
    model = LEAP(knowledge=data.knowledge, embedding_dim=8)
    batch = first_batch(data)
    logits, targets, valid = model.sequence_logits(batch)
    visits = int(batch["visit_mask"].sum())
    longest = int(batch["medications"].sum(-1).max())
    assert logits.shape == (visits, longest + 1, 4 + 2)
    assert targets.shape == valid.shape == (visits, longest + 1)
    loss = model.compute_loss(batch)["loss"]
    assert torch.isfinite(loss) and loss > 0


def scripted(model, logits_per_step):
    """Replace the decoder step by fixed logits per step (the same for every visit); counts the calls."""
    calls = []

    def step(token, state, memory, keys, score_bias):
        calls.append(token.clone())
        out = torch.tensor(logits_per_step[min(len(calls) - 1, len(logits_per_step) - 1)])
        return out.expand(len(token), -1), state

    model.step = step
    return calls


def test_greedy_decoding_never_repeats_and_stops_at_end(data):
    model = LEAP(knowledge=data.knowledge, embedding_dim=8).eval()
    batch = first_batch(data)
    # tokens: drugs 0..3, START 4, END 5. Every step ranks drug 2 first, then START, drug 0, END.
    ranking = [2.0, -1.0, 5.0, -2.0, 4.0, 1.0]
    calls = scripted(model, [ranking])
    chosen, mean_probs = model.decode(batch)
    # step 1 picks 2; step 2 cannot repeat 2 nor pick START: drug 0; step 3: END, which ends the set
    assert chosen.int().tolist() == [[1, 0, 1, 0]] * int(batch["visit_mask"].sum())
    assert len(calls) == 3
    assert calls[1].unique().tolist() == [2] and calls[2].unique().tolist() == [0]
    torch.testing.assert_close(mean_probs[0], torch.tensor(ranking).softmax(-1)[:4])
    scores = model.predict_probabilities(batch)
    assert torch.equal(scores[batch["visit_mask"]] >= 0.5, chosen)
    assert (scores[~batch["visit_mask"]] == 0).all()


def test_max_length_caps_the_set(data):
    model = LEAP(knowledge=data.knowledge, embedding_dim=8, max_length=1).eval()
    calls = scripted(model, [[2.0, -1.0, 5.0, -2.0, 4.0, 1.0]])
    chosen, _ = model.decode(first_batch(data))
    assert chosen.sum(-1).tolist() == [1] * len(chosen) and chosen[:, 2].all()
    assert len(calls) == 2  # the second step could only end the set


def test_a_visit_depends_on_its_own_diagnoses_only(data):
    torch.manual_seed(0)
    model = LEAP(knowledge=data.knowledge, embedding_dim=8).eval()
    batch = first_batch(data)
    b = int(torch.argmax(batch["lengths"]))
    before = model(batch)
    changed = {k: v.clone() for k, v in batch_tensors(batch).items()}
    changed["medications"][b] = 1 - changed["medications"][b]
    changed["procedures"][b] = (changed["procedures"][b] + 1) % data.knowledge.num_procedures
    changed["diagnoses"][b, 2] = (changed["diagnoses"][b, 2] + 1) % data.knowledge.num_diagnoses
    after = model(changed)
    torch.testing.assert_close(before[b, :2], after[b, :2])
    empty = {k: v.clone() for k, v in batch_tensors(batch).items()}
    empty["diagnoses_mask"][b] = False  # no diagnosis: zero context, no NaN
    assert torch.isfinite(model.predict_probabilities(empty)).all()


def test_leap_learns_the_synthetic_signal():
    data = VisitSequenceDataModule(synthetic_patients=300, synthetic_seed=7, batch_size=16)
    data.setup("fit")
    frequency = fit_and_test(DrugFrequency(knowledge=data.knowledge), data, epochs=1)
    torch.manual_seed(0)
    result = fit_and_test(LEAP(knowledge=data.knowledge, lr=2e-2, dropout=0.0), data, epochs=6)
    # LEAP reads the diagnoses only (no procedures, no history): a smaller gain than the other methods'
    assert result["test_jaccard"] > frequency["test_jaccard"] + 0.07
    assert result["test_f1"] > frequency["test_f1"] + 0.07


@pytest.mark.parametrize(
    "options, message",
    [({"max_length": 0}, "max_length"), ({"attention_dim": -3}, "attention_dim"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_options_are_refused_by_name(data, options, message):
    with pytest.raises(ValueError, match=message):
        LEAP(knowledge=data.knowledge, **options)


@pytest.mark.parametrize("option", ["threshold", "margin_weight"])
def test_leap_takes_no_threshold_or_margin(data, option):
    with pytest.raises(TypeError, match=option):
        LEAP(knowledge=data.knowledge, **{option: 0.4})


def test_packed_teacher_forcing_equals_stepping_every_visit_to_the_longest(data):
    """Training runs only the visits whose sequence is still going at each step; the logits of the
    real tokens must equal stepping every visit through the longest sequence."""
    torch.manual_seed(0)
    model = LEAP(knowledge=data.knowledge, embedding_dim=8).eval()
    batch = first_batch(data)
    logits, targets, valid = model.sequence_logits(batch)
    assert len(set(valid.sum(1).tolist())) > 1  # sequences of several lengths, so packing matters
    memory, keys, score_bias = model.encode(batch)
    token, state = model.initial_state(len(targets), memory.device)
    expected = []
    for k in range(targets.shape[1]):
        out, state = model.step(token, state, memory, keys, score_bias)
        expected.append(out)
        token = targets[:, k]
    torch.testing.assert_close(logits[valid], torch.stack(expected, dim=1)[valid])
