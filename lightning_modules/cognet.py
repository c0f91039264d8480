"""COGNet (Wu et al., WWW 2022, arXiv 2202.06588): the drug set generated drug by drug, each drug
either copied from an earlier visit or generated anew ("copy-or-predict").

Section numbers refer to the paper. Details the paper leaves open follow the authors' code
(github.com/BarryRun/COGNet, ``src/COGNet_model.py``, ``src/beam.py``); departures from paper
or code are listed in the class docstring. Everything is batched: one training step decodes every
visit of every patient of the batch with teacher forcing, and beam search advances the beams of
all visits of an evaluation batch together.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from datamodules.batches import VisitBatch
from datamodules.errors import OptionError
from datamodules.options import DropoutRate, PositiveInt
from lightning_modules.base import MedRecModule
from lightning_modules.gamenet import DrugGraphEncoder
from lightning_modules.precision import float32

log = logging.getLogger(__name__)

DrugOrder = Literal["rare_first", "frequent_first", "index"]
DRUG_ORDERS = ("rare_first", "frequent_first", "index")
TINY = 1e-12  # floor of a probability before its log (a copy-only drug may get exactly 0)


def attention_padding(mask: torch.Tensor) -> torch.Tensor:
    """``key_padding_mask`` (True = ignore) from a (N, L) real-code mask. A row without any real
    code (a visit without procedures) keeps its first slot, a zero vector, so attention over it
    stays finite instead of NaN."""
    keep = mask.clone()
    keep[:, 0] |= ~mask.any(-1)
    return ~keep


class SelfAttentivePooling(nn.Module):
    """Visit vector v = Σ_i α_i h_i with α = softmax(w₂ᵀ tanh(W₁ h_i)) over a visit's codes
    (the representation the visit-level copy scores compare, Sec. 3.3)."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, states: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        scores = self.score(states).squeeze(-1).masked_fill(padding, float("-inf"))
        return (torch.softmax(scores, -1).unsqueeze(-1) * states).sum(-2)


class DrugDecoderLayer(nn.Module):
    """One decoder layer (Sec. 3.4): masked self-attention over the drugs generated so far, then
    attention from each drug to the visit's encoded diagnoses and to its encoded procedures (the
    two summed, as in the authors' code), then a feed-forward block; post-norm residuals.

    ``query`` are the positions to compute and ``context`` the whole prefix they attend to: in
    training both are the full teacher-forced sequence under a causal mask; in beam search the
    query is only the last token (with one layer its output depends on the prefix's inputs only,
    so earlier positions need not be recomputed).
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.diag_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.proc_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim), nn.Dropout(dropout)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, context, diag, diag_padding, proc, proc_padding, causal: bool) -> torch.Tensor:
        mask = None
        if causal:
            steps = query.shape[1]
            mask = torch.ones(steps, steps, dtype=torch.bool, device=query.device).triu(1)
        h = self.norms[0](query + self.dropout(self.self_attn(query, context, context, attn_mask=mask)[0]))
        to_diag = self.diag_attn(h, diag, diag, key_padding_mask=diag_padding)[0]
        to_proc = self.proc_attn(h, proc, proc, key_padding_mask=proc_padding)[0]
        h = self.norms[1](h + self.dropout(to_diag) + self.dropout(to_proc))
        return self.norms[2](h + self.feed_forward(h))


@dataclass
class EncodedVisits:
    """Encoder outputs of the N real visits of a batch (row n = visit ``(patient[n], step[n])``)."""

    diag: torch.Tensor  # (N, Ld, d) encoded diagnoses
    diag_padding: torch.Tensor  # (N, Ld) True = not a code
    proc: torch.Tensor  # (N, Lp, d)
    proc_padding: torch.Tensor  # (N, Lp)
    copy_keys: torch.Tensor  # (N, H, d) encoded drugs of the patient's visits, H = T·Lm
    copy_drugs: torch.Tensor  # (N, H) drug index of each key
    copy_log_weight: torch.Tensor  # (N, H) log visit score of the key's visit; -inf = not copyable
    has_history: torch.Tensor  # (N,) the visit has an earlier visit to copy from
    memory: torch.Tensor  # (M + 2, d) drug memory rows of the decoder inputs (END, SOS: zero)

    @property
    def visits(self) -> int:
        return self.diag.shape[0]


@dataclass
class BeamResult:
    """Beam search's answer for N visits."""

    tokens: torch.Tensor  # (N, S) the best beam's tokens after SOS: drugs, then END (repeated)
    drugs: torch.Tensor  # (N, M) bool, the recommended set (the drugs among ``tokens``)
    ranking: torch.Tensor  # (N, M) scores for the ranking metrics, >= 0.5 exactly on ``drugs``
    log_prob: torch.Tensor  # (N,) the best beam's score, Σ log P of its tokens


class COGNet(MedRecModule):
    """COGNet: Transformer encoders, a drug-by-drug decoder, copy-or-predict and beam search.

    Encoders (Sec. 3.2): diagnoses, procedures and each earlier visit's drugs are code sets,
    each embedded (dropout ``embedding_dropout``) and encoded by its own Transformer encoder
    layer (``heads`` heads, feed-forward width ``encoder_ff_dim``, dropout ``dropout``; no
    positions: the codes of a visit have no order). A GCN over the training-split
    co-prescription graph minus a learnable β times a GCN over the DDI graph gives the drug
    memory E = E_ehr − β E_ddi (GAMENet's memory bank), added to the decoder's drug embeddings.

    Decoder (Sec. 3.4): a visit's drug set is a sequence SOS, m_1, ..., m_n, END, the drugs in
    ``drug_order`` (``rare_first``: by ascending training-split frequency, the authors' order).
    :class:`DrugDecoderLayer` gives a state h_i for each prefix; from it

    * generation: P_g = softmax(W_o h_i) over the M drugs and END;
    * copy (Sec. 3.3): visit scores c_j = softmax_j((v_d^t·v_d^j + v_p^t·v_p^j)/√d) over the
      earlier visits j < t (v = :class:`SelfAttentivePooling` of the encoded codes); drug scores
      q_k = softmax_k(W_c h_i · e_k/√d) over the encoded drugs e_k of all earlier visits;
      P_c(m) = Σ_{k: drug m} c_{j(k)} q_k / Σ_k c_{j(k)} q_k, so a drug prescribed in several
      earlier visits gathers the mass of each;
    * P = z P_g + (1 − z) P_c with z = σ(W_z h_i); a first visit has nothing to copy: P = P_g.

    Loss: negative log-likelihood of the teacher-forced sequence (drugs then END), averaged
    over the tokens of the batch. Inference: beam search (``beam_size`` beams per visit; the
    score is the sum of the log-probabilities, a drug already in a beam is not proposed again,
    a beam stops at END, at most ``max_drugs`` drugs); validation decodes with
    ``val_beam_size`` (1 = greedy, as the authors' validation). The best beam is the
    recommended set. Each drug also gets a score for the ranking metrics (PRAUC): a drug of the
    set scores 0.5 + p/2 with p its probability when it was generated, any other drug
    < 0.5, half its highest probability along the best beam (the authors rank by these
    probabilities too); so the set is exactly the drugs scoring >= 0.5 and ``threshold`` is
    fixed at 0.5.

    Departures:

    * The authors' GCNs share their first layer between the two graphs; here each graph has its
      own two-layer GCN (:class:`lightning_modules.gamenet.DrugGraphEncoder`), and the EHR graph
      comes from the training split only (the authors' file holds test co-prescriptions).
    * The authors order the drugs by their frequency over all patients, test patients included;
      here over the training patients.
    * The visit scores of the authors' code also give weight to an all-zero "visit before the
      first" whose drugs are masked; the paper's softmax over the earlier visits is used.
    * No DDI loss, as paper and code (the code's is commented out); DDI enters through the memory.

    Args:
        embedding_dim: width d of every embedding and hidden state (64).
        heads: attention heads of encoders and decoder (2).
        encoder_ff_dim: feed-forward width of the encoder layers (the code's PyTorch default 2048).
        decoder_ff_dim: feed-forward width of the decoder layer (the code's 2d = 128).
        dropout: dropout inside encoders and decoder (0.2).
        embedding_dropout: dropout on the code and drug embeddings (0.3).
        gcn_dropout: dropout between the GCN layers (0.3).
        beam_size: beams per visit at test and predict time (4).
        val_beam_size: beams per visit in validation (1, greedy).
        max_drugs: most drugs a generated set may hold (45, the authors' ``max_len``).
        drug_order: the order of the teacher-forced sequences, ``rare_first``, ``frequent_first``
            (training-split frequency) or ``index`` (vocabulary order).
        Other arguments (lr, bootstrap...) as in :class:`MedRecModule`.
    """

    EVALUATION_SETTINGS = (*MedRecModule.EVALUATION_SETTINGS, "beam_size", "max_drugs")

    def __init__(
        self,
        *args,
        embedding_dim: PositiveInt = 64,
        heads: PositiveInt = 2,
        encoder_ff_dim: PositiveInt = 2048,
        decoder_ff_dim: PositiveInt = 128,
        dropout: DropoutRate = 0.2,
        embedding_dropout: DropoutRate = 0.3,
        gcn_dropout: DropoutRate = 0.3,
        beam_size: PositiveInt = 4,
        val_beam_size: PositiveInt = 1,
        max_drugs: PositiveInt = 45,
        drug_order: DrugOrder = "rare_first",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.threshold != 0.5:
            raise OptionError(
                f"COGNet recommends the drugs it generates (scored >= 0.5): threshold must stay 0.5, "
                f"got {self.threshold}"
            )
        if self.hparams.margin_weight != 0:
            raise OptionError("COGNet is trained by the likelihood of the drug sequence; margin_weight must be 0")
        if drug_order not in DRUG_ORDERS:
            raise OptionError(f"drug_order must be one of {DRUG_ORDERS}, got {drug_order!r}")
        for name, value in (("beam_size", beam_size), ("val_beam_size", val_beam_size), ("max_drugs", max_drugs)):
            if int(value) < 1:
                raise OptionError(f"{name} must be >= 1, got {value}")
        if embedding_dim % heads:
            raise OptionError(f"embedding_dim ({embedding_dim}) must be a multiple of heads ({heads})")
        k, d = self.knowledge, embedding_dim
        m = k.num_medications
        self.end_token, self.start_token = m, m + 1
        self.diag_embedding = nn.Embedding(k.num_diagnoses, d)
        self.proc_embedding = nn.Embedding(max(1, k.num_procedures), d)
        self.drug_embedding = nn.Embedding(m + 2, d)  # drugs, END, SOS
        self.embedding_dropout = nn.Dropout(embedding_dropout)

        def encoder() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(d, heads, encoder_ff_dim, dropout, batch_first=True)

        self.diag_encoder, self.proc_encoder, self.drug_encoder = encoder(), encoder(), encoder()
        self.diag_pool, self.proc_pool = SelfAttentivePooling(d), SelfAttentivePooling(d)
        self.ehr_gcn = DrugGraphEncoder(k.ehr_adj, d, gcn_dropout)
        self.ddi_gcn = DrugGraphEncoder(k.ddi_adj, d, gcn_dropout)
        self.beta = nn.Parameter(torch.empty(1).uniform_(-0.1, 0.1))
        self.decoder = DrugDecoderLayer(d, heads, decoder_ff_dim, dropout)
        self.generate = nn.Linear(d, m + 1)  # W_o: drugs and END
        self.copy_query = nn.Linear(d, d)  # W_c
        self.gate = nn.Linear(d, 1)  # W_z
        # rank of each drug in the teacher-forced order; set from the training split at fit time
        self.register_buffer("drug_rank", torch.arange(m))

    # --- data ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self._set_drug_rank()

    def _set_drug_rank(self) -> None:
        order = self.hparams.drug_order
        shares = self.knowledge.drug_prevalence  # share of training visits per drug (the training split)
        if order == "index" or shares is None:
            if order != "index":
                log.warning("COGNet: the knowledge has no training drug prevalence; drugs keep the vocabulary order")
            self.drug_rank.copy_(torch.arange(self.num_medications))
            return
        self.drug_rank.copy_(torch.as_tensor(drug_ranks(np.asarray(shares, np.float64), order)))

    def drug_sequences(self, medications: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, M) multi-hot -> (N, L) drug indices in ``drug_order`` and (N, L) real-slot mask, L = largest set."""
        present = medications > 0
        key = torch.where(present, self.drug_rank, self.drug_rank + self.num_medications)
        counts = present.sum(-1)
        width = max(1, int(counts.max())) if len(counts) else 1
        drugs = key.argsort(-1)[:, :width]
        return drugs, torch.arange(width, device=drugs.device) < counts[:, None]

    # --- encoders ------------------------------------------------------------------------
    def drug_memory(self) -> torch.Tensor:
        """(M + 2, d): E_ehr − β E_ddi for the drugs, zero rows for END and SOS."""
        bank = self.ehr_gcn() - self.beta * self.ddi_gcn()
        return torch.cat([bank, bank.new_zeros(2, bank.shape[1])])

    def _encode_codes(self, embedding, encoder, codes, mask) -> tuple[torch.Tensor, torch.Tensor]:
        padding = attention_padding(mask)
        vectors = self.embedding_dropout(embedding(codes)) * mask.unsqueeze(-1).to(embedding.weight.dtype)
        return encoder(vectors, src_key_padding_mask=padding), padding

    def encode(self, batch: VisitBatch) -> EncodedVisits:
        """Encoders and copy sources of every real visit, all patients at once."""
        visit_mask = batch["visit_mask"]
        patient, step = visit_mask.nonzero(as_tuple=True)
        batch_size, visits = visit_mask.shape
        d = self.hparams.embedding_dim
        diag, diag_padding = self._encode_codes(
            self.diag_embedding, self.diag_encoder, batch["diagnoses"][visit_mask], batch["diagnoses_mask"][visit_mask]
        )
        procedures, procedures_mask = batch["procedures"][visit_mask], batch["procedures_mask"][visit_mask]
        proc, proc_padding = self._encode_codes(self.proc_embedding, self.proc_encoder, procedures, procedures_mask)
        drugs, drug_mask = self.drug_sequences(batch["medications"][visit_mask])
        encoded_drugs, _ = self._encode_codes(self.drug_embedding, self.drug_encoder, drugs, drug_mask)

        # visit-level copy scores c_tj over earlier visits j < t (Sec. 3.3)
        pooled = torch.zeros(2, batch_size, visits, d, dtype=diag.dtype, device=diag.device)
        pooled[0, patient, step] = self.diag_pool(diag, diag_padding)
        pooled[1, patient, step] = self.proc_pool(proc, proc_padding)
        similarity = (pooled @ pooled.transpose(-1, -2)).sum(0) / math.sqrt(d)  # (B, T, T)
        order = torch.arange(visits, device=diag.device)
        earlier = (order[None, :] < order[:, None]) & visit_mask[:, None, :]  # (B, T, T) key j before query t
        has_history = earlier.any(-1)
        similarity = similarity.masked_fill(~earlier, float("-inf")).masked_fill(~has_history[..., None], 0.0)
        log_visit = torch.log_softmax(similarity, -1)
        log_visit = log_visit.masked_fill(~earlier, float("-inf"))[patient, step]  # (N, T)

        # every visit's encoded drugs in the patient's (T, Lm) grid; row n reads its patient's
        width = drugs.shape[1]
        keys = encoded_drugs.new_zeros(batch_size, visits, width, d)
        keys[patient, step] = encoded_drugs
        key_drugs = drugs.new_zeros(batch_size, visits, width)
        key_drugs[patient, step] = drugs
        key_real = torch.zeros(batch_size, visits, width, dtype=torch.bool, device=drugs.device)
        key_real[patient, step] = drug_mask
        key_weight = log_visit.unsqueeze(-1).expand(-1, -1, width).masked_fill(~key_real[patient], float("-inf"))
        return EncodedVisits(
            diag=diag,
            diag_padding=diag_padding,
            proc=proc,
            proc_padding=proc_padding,
            copy_keys=keys[patient].flatten(1, 2),
            copy_drugs=key_drugs[patient].flatten(1),
            copy_log_weight=key_weight.flatten(1),
            has_history=torch.isfinite(key_weight.flatten(1)).any(-1),
            memory=self.drug_memory(),
        )

    # --- decoder -------------------------------------------------------------------------
    def token_probabilities(self, encoded: EncodedVisits, tokens: torch.Tensor, last_only: bool = False):
        """P(next token) after each prefix of ``tokens`` (N, K, S) (K sequences per visit):
        (N, K, S, M + 1), or (N, K, 1, M + 1) for the last position only."""
        n, beams, steps = tokens.shape
        flat = tokens.reshape(n * beams, steps)
        inputs = self.embedding_dropout(self.drug_embedding(flat)) + encoded.memory[flat]

        def per_sequence(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(beams, 0) if beams > 1 else x

        query = inputs[:, -1:] if last_only else inputs
        hidden = self.decoder(
            query,
            inputs,
            per_sequence(encoded.diag),
            per_sequence(encoded.diag_padding),
            per_sequence(encoded.proc),
            per_sequence(encoded.proc_padding),
            causal=not last_only,
        )
        with float32(hidden):
            hidden = hidden.float()
            generated = torch.softmax(self.generate(hidden), -1)
            copied = self.copy_distribution(hidden.reshape(n, -1, hidden.shape[-1]), encoded).view_as(generated)
            gate = torch.sigmoid(self.gate(hidden))
            history = per_sequence(encoded.has_history)[:, None, None]
            probs = torch.where(history, gate * generated + (1 - gate) * copied, generated)
        return probs.view(n, beams, -1, probs.shape[-1])

    def copy_distribution(self, hidden: torch.Tensor, encoded: EncodedVisits) -> torch.Tensor:
        """P_c (N, Q, M + 1) from decoder states (N, Q, d); all zero where a visit has no history."""
        keys = encoded.copy_keys.to(hidden.dtype)
        scores = self.copy_query(hidden) @ keys.transpose(1, 2) / math.sqrt(hidden.shape[-1])
        # c_j q_k / Σ c q = softmax_k(score_k + log c_j(k)); a visit without history gets a dummy
        # finite row, then zero
        weight = encoded.copy_log_weight.masked_fill(~encoded.has_history[:, None], 0.0)
        attention = torch.softmax(scores + weight[:, None, :], -1) * encoded.has_history[:, None, None]
        out = hidden.new_zeros(*hidden.shape[:2], self.num_medications + 1)
        return out.scatter_add_(-1, encoded.copy_drugs[:, None, :].expand_as(attention), attention)

    def teacher_forced(self, batch: VisitBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token probabilities (N, L + 1, M + 1) of every real visit's sequence, its targets
        (drugs then END) and the (N, L + 1) mask of real targets."""
        encoded = self.encode(batch)
        drugs, real = self.drug_sequences(batch["medications"][batch["visit_mask"]])
        n = drugs.shape[0]
        start = drugs.new_full((n, 1), self.start_token)
        inputs = torch.cat([start, drugs.masked_fill(~real, self.end_token)], 1)
        targets = torch.cat([drugs, drugs.new_zeros(n, 1)], 1)
        lengths = real.sum(-1)
        targets[torch.arange(n, device=drugs.device), lengths] = self.end_token
        target_mask = torch.arange(targets.shape[1], device=drugs.device) <= lengths[:, None]
        probs = self.token_probabilities(encoded, inputs[:, None])[:, 0]
        return probs, targets, target_mask

    def sequence_loss(self, batch: VisitBatch) -> dict[str, torch.Tensor]:
        probs, targets, target_mask = self.teacher_forced(batch)
        with float32(probs):
            picked = probs.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll = -torch.log(picked.clamp_min(TINY))[target_mask].mean()
        return {"loss": nll, "nll": nll}

    def training_step(self, batch: VisitBatch, batch_idx: int) -> torch.Tensor:
        losses = self.sequence_loss(batch)
        self.log_train_losses(losses, batch_size=len(batch["lengths"]))
        return losses["loss"]

    # --- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def beam_search(self, encoded: EncodedVisits, beam_size: int) -> BeamResult:
        """The best beam of every visit (see :class:`BeamResult` and the class docstring)."""
        n, m, k = encoded.visits, self.num_medications, beam_size
        device = encoded.diag.device
        tokens = torch.full((n, k, 1), self.start_token, dtype=torch.long, device=device)
        scores = torch.full((n, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # identical beams at the start: only the first may expand
        finished = torch.zeros(n, k, dtype=torch.bool, device=device)
        chosen = torch.zeros(n, k, m, dtype=torch.bool, device=device)
        chosen_prob = torch.zeros(n, k, m, device=device)
        best_prob = torch.zeros(n, k, m, device=device)
        only_end = torch.full((m + 1,), float("-inf"), device=device)
        only_end[self.end_token] = 0.0
        for step in range(self.hparams.max_drugs + 1):
            probs = self.token_probabilities(encoded, tokens, last_only=True)[:, :, 0].float()
            log_probs = torch.log(probs.clamp_min(TINY))
            log_probs[..., :m] = log_probs[..., :m].masked_fill(chosen, float("-inf"))  # a set: no repeats
            if step == self.hparams.max_drugs:
                log_probs = only_end.expand_as(log_probs)
            log_probs = torch.where(finished[..., None], only_end, log_probs)  # a finished beam stays as it is
            top, flat = (scores[..., None] + log_probs).flatten(1).topk(k, -1)
            parent, token = flat // (m + 1), flat % (m + 1)

            was_finished, probs, tokens = follow(parent, finished), follow(parent, probs), follow(parent, tokens)
            chosen, chosen_prob, best_prob = (follow(parent, x) for x in (chosen, chosen_prob, best_prob))
            best_prob = torch.where(was_finished[..., None], best_prob, torch.maximum(best_prob, probs[..., :m]))
            new_drug = ((token < m) & ~was_finished).unsqueeze(-1)
            slot = token.clamp(max=m - 1).unsqueeze(-1)
            chosen = chosen | (new_drug & (torch.arange(m, device=device) == slot))
            chosen_prob = torch.where(new_drug, chosen_prob.scatter(-1, slot, probs.gather(-1, slot)), chosen_prob)
            finished = was_finished | (token == self.end_token) | torch.isinf(top)
            scores = top
            tokens = torch.cat([tokens, token.unsqueeze(-1)], -1)
            if bool(finished.all()):
                break
        best = scores.argmax(-1)
        rows = torch.arange(n, device=device)
        in_set, at_choice, highest = chosen[rows, best], chosen_prob[rows, best], best_prob[rows, best]
        ranking = torch.where(in_set, 0.5 + 0.5 * at_choice, 0.5 * highest.clamp(max=1 - 1e-6))
        return BeamResult(tokens=tokens[rows, best, 1:], drugs=in_set, ranking=ranking, log_prob=scores[rows, best])

    def predict_probabilities(self, batch: VisitBatch) -> torch.Tensor:
        validating = self._trainer is not None and (self.trainer.validating or self.trainer.sanity_checking)
        beams = self.hparams.val_beam_size if validating else self.hparams.beam_size
        mask = batch["visit_mask"]
        ranking = self.beam_search(self.encode(batch), int(beams)).ranking
        out = ranking.new_zeros(*mask.shape, self.num_medications)
        out[mask] = ranking
        return out

    def forward(self, batch: VisitBatch) -> torch.Tensor:
        """Logits of the ranking scores (B, T, M): >= 0 exactly for the generated set."""
        return torch.logit(self.predict_probabilities(batch), eps=1e-6)


def follow(parent: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (N, K, ...) reordered to the beams' parents (N, K)."""
    index = parent.view(*parent.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def drug_ranks(counts: np.ndarray, order: DrugOrder) -> np.ndarray:
    """Rank of each drug in the teacher-forced sequence (0 first); ties by vocabulary index."""
    if order == "index":
        return np.arange(len(counts))
    key = counts if order == "rare_first" else -counts
    ranks = np.empty(len(counts), dtype=np.int64)
    ranks[np.argsort(key, kind="stable")] = np.arange(len(counts))
    return ranks
