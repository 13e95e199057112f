"""Activation-based importance of every elastic axis (Minitron / Minitron-SSM), on calibration data.

Width scores aggregate an activation's magnitude as "mean over the sequence, L2 over the batch",
the combination Minitron found to rank best. Which activation scores which axis is the family's
knowledge (its ``width_hooks``): the residual stream after every norm for ``hidden``, the input of
an MLP's down projection per neuron, per head the activation entering a mixer's output projection
(grouped heads are later ranked within their group).

Depth scores skip one layer at a time (the residual carries its input through) and measure how the
output moves: the normalised MSE of the logits against the full model, and the rise in LM loss.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from elastic.losses import hidden_states, next_token_labels
from elastic.models import family_for
from elastic.models.family import Ranking


class _SeqMeanBatchL2:
    """Accumulates sum over sequences of (mean over tokens of |a|)^2; `result()` takes the sqrt."""

    def __init__(self):
        self.sq: dict[str, torch.Tensor] = {}

    def add(self, key: str, per_seq: torch.Tensor) -> None:  # per_seq: [B, C]
        v = per_seq.float().pow(2).sum(0).cpu()
        self.sq[key] = self.sq[key] + v if key in self.sq else v

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v.sqrt() for k, v in self.sq.items()}


def _logit_sums(head: nn.Module, h_ref: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, chunk: int):
    """Sums over tokens, a `chunk` of tokens at a time (``[tokens x vocab]`` is never built whole):
    squared logit difference to the reference, squared reference logits, LM cross-entropy of `h`'s logits
    and the labelled-token count."""
    h_ref, h, labels = h_ref.flatten(0, -2), h.flatten(0, -2), labels.flatten()
    diff = ref_sq = ce = 0.0
    for i in range(0, h.shape[0], chunk):
        ref = head(h_ref[i : i + chunk]).float()
        out = head(h[i : i + chunk]).float()
        diff += float((out - ref).pow(2).sum())
        ref_sq += float(ref.pow(2).sum())
        ce += float(nn.functional.cross_entropy(out, labels[i : i + chunk], ignore_index=-100, reduction="sum"))
    return diff, ref_sq, ce, int((labels != -100).sum())


@torch.no_grad()
def width_scores(model, batches: Iterable[torch.Tensor], *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Scores of the hidden channels and of every per-layer unit the family's hooks report (higher =
    more important)."""
    family = family_for(model)
    acc = _SeqMeanBatchL2()
    hooks = family.width_hooks(model, family.Sizes.from_config(model.config), acc.add)
    device = next(model.parameters()).device
    try:
        for ids in tqdm(list(batches), desc="importance: width", disable=not progress, unit="batch"):
            hidden_states(model, ids.to(device))  # every hooked module runs; no logits are needed
    finally:
        for h in hooks:
            h.remove()
    return acc.result()


@torch.no_grad()
def depth_scores(model, batches: Iterable[torch.Tensor], *, progress: bool = True,
                 chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Per-layer importance by skipping it alone: ``depth_mse`` (normalised logit MSE) and ``depth_loss``
    (LM-loss rise). Higher = more important.

    Only final hidden states are kept per forward; logits are compared `chunk_size` tokens at a time,
    so a 9B at 4 x 4096 tokens holds two ``[B, S, hidden]`` tensors and one ``[chunk, vocab]`` pair
    instead of two fp32 ``[B, S, 131072]`` logits (32 GiB)."""
    family = family_for(model)
    layers_ = family.decoder_layers(model)
    n = len(layers_)
    mse = torch.zeros(n, dtype=torch.float64)
    dloss = torch.zeros(n, dtype=torch.float64)
    batches = list(batches)
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    bar = tqdm(total=len(batches) * (n + 1), desc="importance: depth", disable=not progress, unit="fwd")
    try:
        for ids in batches:
            ids = ids.to(device)
            labels = next_token_labels(ids)
            full = hidden_states(model, ids)
            _, denom, base, count = _logit_sums(head, full, full, labels, chunk_size)
            bar.update()
            for i in range(n):
                # Bypassing a block == its residual alone; swapping the list is cheaper than running it.
                family.set_decoder_layers(model, nn.ModuleList([b for j, b in enumerate(layers_) if j != i]))
                try:
                    skipped = hidden_states(model, ids)
                finally:
                    family.set_decoder_layers(model, layers_)
                diff, _, ce, _ = _logit_sums(head, full, skipped, labels, chunk_size)
                mse[i] += diff / denom
                dloss[i] += (ce - base) / count
                bar.update()
    finally:
        bar.close()
    k = max(len(batches), 1)
    return {"depth_mse": (mse / k).float(), "depth_loss": (dloss / k).float()}


def compute_scores(model, batches, *, depth: bool = True, progress: bool = True,
                   chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """All importance scores of `model` on `batches` (token-id tensors [B, S])."""
    batches = list(batches)
    scores = width_scores(model, batches, progress=progress)
    if depth:
        scores.update(depth_scores(model, batches, progress=progress, chunk_size=chunk_size))
    return scores


def versus_random(model, ranking, make, batches, seeds) -> dict:
    """Held-out loss of the sub-network `make(ranking)` under the importance ranking and under random rankings.

    `make(ranking) -> Arch` builds the architecture for a ranking (so depth pruning can pick the layers
    from each ranking's own depth order); the random rankings are seeded, one per entry of `seeds`.
    Used by the benchmark and the test that importance beats random.
    """
    from elastic.inputs import heldout_loss

    family = family_for(model)
    parent = family.Sizes.from_config(model.config)
    arch = make(ranking)
    out = {"arch": arch.to_dict(), "params": arch.num_params(), "parent_params": parent.num_params()}
    out["importance"] = heldout_loss(family.slice_model(model, arch, ranking), batches)
    rand = []
    for s in seeds:
        r = Ranking.random(parent, torch.Generator().manual_seed(int(s)))
        rand.append(heldout_loss(family.slice_model(model, make(r), r), batches))
    out["random"] = rand
    out["random_mean"] = sum(rand) / len(rand)
    return out
