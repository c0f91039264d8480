"""LEAP (Zhang et al., KDD 2017): medication recommendation as sequence-to-sequence decoding.

The paper decodes a visit's drug set token by token from its diagnoses, attending over the
diagnosis embeddings at every step; medrec's LEAP is the supervised model of the paper (its
reinforcement fine-tuning is not part of the row later papers report). Where the paper is
silent, the LEAP baseline of the SafeDrug code (github.com/ycq091044/SafeDrug, ``src/models.py``
and ``src/Leap.py``, also in GAMENet's repository) settles the detail: embedding size 64,
dropout 0.3 on the diagnosis and token embeddings, a GRU decoder whose first state is the START
token's embedding, output Linear(ReLU(h)) over the drugs + START + END, lr 5e-4, 50 epochs.

Departures from that code, all deliberate:

* attention follows the paper (additive, v·tanh(W_h h + W_e e_j), at every step over the
  diagnoses). In the code the score is a linear function of [h ; e_j], so the decoder state
  cancels in the softmax, and the attended vector overwrites the diagnosis memory after the
  first step, so later steps attend over one vector;
* greedy decoding never repeats a drug (a drug already decoded is masked before the argmax)
  and stops at END; the code feeds the raw argmax back and removes repeats afterwards, and
  stops after 20 steps (``max_length`` here; None: up to every drug);
* the target order of a visit's drugs is the vocabulary order (the code uses the order of the
  records, which a multi-hot batch does not carry);
* a training step is a batch of patients (every visit decoded at once, teacher forcing), with
  the cross-entropy averaged per visit and then over visits; the code steps once per visit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.batches import VisitBatch
from datamodules.knowledge import CohortKnowledge
from datamodules.options import DropoutRate, NonNegativeFloat, PositiveFloat, PositiveInt, Probability
from lightning_modules.base import MedRecModule
from lightning_modules.micron import set_scores


class LEAP(MedRecModule):
    """Sequence-to-sequence drug-set decoder with attention over the diagnoses (paper Sec. 3).

    Encoder: the visit's diagnoses as embeddings e_j (no history; LEAP looks at one visit).
    Decoder (Sec. 3.2): with h_0 = emb(START) and y_0 = START, at step k
    α_kj = softmax_j(vᵀ tanh(W_h h_{k-1} + W_e e_j)), c_k = Σ_j α_kj e_j (attention, Eq. 2–3),
    h_k = GRU([c_k ; emb(y_{k-1})], h_{k-1}) and P(y_k) = softmax(W ReLU(h_k) + b) over the M
    drugs, START and END (Eq. 4). Training maximises the likelihood of the visit's drugs (in
    vocabulary order) followed by END, with teacher forcing (Eq. 5). Every real visit of the
    batch is one sequence; the decoder runs one batched step per position, not per visit.

    Inference: greedy decoding, each step choosing the most probable drug not yet chosen, or END,
    which ends the set. The shared metrics receive :func:`set_scores`: decoded drugs score
    0.5 + 0.5·p̄, the others 0.499·p̄, where p̄ is a drug's probability averaged over the steps
    decoded (the SafeDrug code's ranking score), so the recommended set (>= 0.5) is exactly the
    decoded one and the recommendation threshold is not an option.

    Args:
        embedding_dim: size of diagnosis/token embeddings and decoder state (64).
        attention_dim: size of the additive attention's hidden layer (None: embedding_dim).
        dropout: dropout on the diagnosis and token embeddings (0.3).
        max_length: at most this many drugs per decoded set (None: every drug).
    """

    EVALUATION_SETTINGS = ("bootstrap_rounds", "bootstrap_fraction", "bootstrap_seed", "max_length")

    def __init__(
        self,
        knowledge: CohortKnowledge | None = None,
        lr: PositiveFloat = 5e-4,
        weight_decay: NonNegativeFloat = 0.0,
        bootstrap_rounds: PositiveInt = 10,
        bootstrap_fraction: Probability = 0.8,
        bootstrap_seed: int = 0,
        embedding_dim: PositiveInt = 64,
        attention_dim: PositiveInt | None = None,
        dropout: DropoutRate = 0.3,
        max_length: PositiveInt | None = None,
    ):
        super().__init__(
            knowledge,
            lr=lr,
            weight_decay=weight_decay,
            bootstrap_rounds=bootstrap_rounds,
            bootstrap_fraction=bootstrap_fraction,
            bootstrap_seed=bootstrap_seed,
        )
        # collected from MedRecModule's frame, but LEAP takes neither (its sets are decoded): a
        # checkpoint carrying them would not load into a model built in Python
        for fixed in ("threshold", "margin_weight"):
            self.hparams.pop(fixed, None)
        for name, value in (("embedding_dim", embedding_dim), ("attention_dim", attention_dim),
                            ("max_length", max_length)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"LEAP: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LEAP: dropout must lie in [0, 1), got {dropout}")
        k = self.knowledge
        dim, att = embedding_dim, attention_dim or embedding_dim
        self.start_token, self.end_token = k.num_medications, k.num_medications + 1
        self.diag_embedding = nn.Embedding(k.num_diagnoses, dim)
        self.token_embedding = nn.Embedding(k.num_medications + 2, dim)
        self.dropout = nn.Dropout(dropout)
        self.attend_state = nn.Linear(dim, att, bias=False)
        self.attend_code = nn.Linear(dim, att)
        self.attend_score = nn.Linear(att, 1, bias=False)
        self.decoder = nn.GRUCell(2 * dim, dim)
        self.output = nn.Linear(dim, k.num_medications + 2)

    # --- pieces --------------------------------------------------------------------------
    def encode(self, batch: VisitBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Diagnosis embeddings (N, L, d), attention keys (N, L, a) and score bias (N, L; -1e4 at padding)
        of the N real visits."""
        mask = batch["visit_mask"]
        codes, code_mask = batch["diagnoses"][mask], batch["diagnoses_mask"][mask]
        memory = self.dropout(self.diag_embedding(codes))
        # Padding gets a zero vector and a score far below any real one: a visit without any
        # diagnosis then attends evenly over zeros (zero context), and no step needs a mask op.
        memory = memory * code_mask.unsqueeze(-1).to(memory.dtype)
        score_bias = (~code_mask).to(memory.dtype) * -1e4
        return memory, self.attend_code(memory), score_bias

    def attend_and_update(
        self, token_input: torch.Tensor, state: torch.Tensor, memory, keys, score_bias
    ) -> torch.Tensor:
        """The decoder's recurrence: attention context from the state (Eq. 3), then the GRU state update."""
        scores = self.attend_score(torch.tanh(keys + self.attend_state(state).unsqueeze(1))).squeeze(-1)
        weights = (scores + score_bias).softmax(-1)
        context = (weights.unsqueeze(-1) * memory).sum(1)
        return self.decoder(torch.cat([context, token_input], dim=-1), state)

    def step(self, token: torch.Tensor, state: torch.Tensor, memory, keys, score_bias) -> tuple[torch.Tensor, ...]:
        """One decoder step for every sequence: (previous token (N,), state (N, d)) -> (logits (N, M+2), state)."""
        state = self.attend_and_update(self.dropout(self.token_embedding(token)), state, memory, keys, score_bias)
        return self.output(F.relu(state)), state

    def initial_state(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        token = torch.full((n,), self.start_token, dtype=torch.long, device=device)
        return token, self.dropout(self.token_embedding(token))

    def target_sequences(self, medications: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, M) multi-hot -> drug indices in vocabulary order then END (N, K), and its mask (K = max set + 1)."""
        n, m = medications.shape
        counts = medications.sum(-1).long()
        length = int(counts.max()) + 1 if n else 1
        # stable descending sort puts a row's drugs first, in vocabulary order
        order = torch.argsort(medications, dim=-1, descending=True, stable=True)[:, :length]
        positions = torch.arange(length, device=medications.device).expand(n, -1)
        tokens = torch.where(positions < counts[:, None], order, torch.full_like(order, self.end_token))
        return tokens, positions <= counts[:, None]

    # --- training ------------------------------------------------------------------------
    def sequence_logits(self, batch: VisitBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits (N, K, M+2), targets (N, K) and their mask for the N real visits."""
        memory, keys, score_bias = self.encode(batch)
        targets, valid = self.target_sequences(batch["medications"][batch["visit_mask"]])
        token, state = self.initial_state(len(targets), memory.device)
        # Teacher forcing knows every step's input token up front: embed them in one call, and
        # apply the output layer once to all states; only the recurrence itself is stepped.
        inputs = self.dropout(self.token_embedding(torch.cat([token[:, None], targets[:, :-1]], dim=1)))
        # Visits sorted longest first: step k runs only the visits whose sequence is still going
        # (the first n_k rows), so a batch costs its real tokens, not visits × longest sequence.
        order = torch.argsort(valid.sum(1), descending=True, stable=True)
        running = valid[order]
        memory, keys, score_bias, inputs, state = (x[order] for x in (memory, keys, score_bias, inputs, state))
        states = []
        for k, n in enumerate(running.sum(0).tolist()):
            state = self.attend_and_update(inputs[:n, k], state[:n], memory[:n], keys[:n], score_bias[:n])
            states.append(state)
        # step-major concatenation = the True cells of running.T in row-major order
        grid = inputs.new_zeros(running.shape[1], running.shape[0], state.shape[-1])
        grid[running.T] = torch.cat(states)
        unsorted = grid.transpose(0, 1)[torch.argsort(order)]
        return self.output(F.relu(unsorted)), targets, valid

    def compute_loss(self, batch: VisitBatch) -> dict[str, torch.Tensor]:
        """Cross-entropy of the drug sequence + END, averaged per visit, then over visits (Eq. 5)."""
        logits, targets, valid = self.sequence_logits(batch)
        token_loss = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        per_visit = (token_loss * valid).sum(1) / valid.sum(1)
        return {"loss": per_visit.mean()}

    def training_step(self, batch: VisitBatch, batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(batch)
        self.log_train_losses(losses, batch_size=len(batch["lengths"]))
        return losses["loss"]

    # --- inference -----------------------------------------------------------------------
    def decode(self, batch: VisitBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding of every real visit: the decoded sets (N, M) bool and p̄ (N, M)."""
        memory, keys, score_bias = self.encode(batch)
        n, m = memory.shape[0], self.num_medications
        token, state = self.initial_state(n, memory.device)
        chosen = torch.zeros(n, m, dtype=torch.bool, device=memory.device)
        running = torch.ones(n, dtype=torch.bool, device=memory.device)
        prob_sum = torch.zeros(n, m, device=memory.device)
        steps = torch.zeros(n, device=memory.device)
        limit = min(m, self.hparams.max_length or m)
        forbidden_start = torch.zeros(1, m + 2, dtype=torch.bool, device=memory.device)
        forbidden_start[0, self.start_token] = True
        for _ in range(limit + 1):  # the last step can only end the set
            if not running.any():
                break
            out, state = self.step(token, state, memory, keys, score_bias)
            out = out.float()
            prob_sum += out.softmax(-1)[:, :m] * running[:, None]
            steps += running.float()
            full = chosen.sum(-1, keepdim=True) >= limit  # a full set can only end
            blocked = torch.cat([chosen | full, torch.zeros(n, 2, dtype=torch.bool, device=chosen.device)], dim=1)
            blocked |= forbidden_start
            token = out.masked_fill(blocked, float("-inf")).argmax(-1)
            drug = running & (token < m)
            chosen[drug.nonzero(as_tuple=True)[0], token[drug]] = True
            running &= token < m
        return chosen, prob_sum / steps.clamp(min=1)[:, None]

    def predict_probabilities(self, batch: VisitBatch) -> torch.Tensor:
        mask = batch["visit_mask"]
        chosen, mean_probs = self.decode(batch)
        scores = mask.new_zeros(*mask.shape, self.num_medications, dtype=torch.float32)
        scores[mask] = set_scores(chosen, mean_probs)
        return scores

    def forward(self, batch: VisitBatch) -> torch.Tensor:
        """Logits of the decoded-set scores (the recommended set is logit >= 0)."""
        return torch.logit(self.predict_probabilities(batch), eps=1e-6)
