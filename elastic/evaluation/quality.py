"""Held-out loss and perplexity, scored in token chunks.

The base model (the decoder without its LM head) runs once per batch; the LM head and the cross-entropy then run over `chunk_tokens`
positions at a time, so the ``[batch, seq, vocab]`` fp32 logits (4 GiB for 8 x 1024 tokens of a
131K vocabulary) are never built whole. `elastic.inputs.heldout_loss` scores the full logits and is
fine for the toy; this one is what the evaluate stage uses for every model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hidden_and_head(model):
    """(base model, LM head) of a causal LM: the head is applied by us, a chunk at a time."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
    return model.base_model, head


@torch.no_grad()
def chunked_loss(model, batches: list[torch.Tensor], chunk_tokens: int = 4096) -> dict:
    """Mean next-token cross-entropy (nats/token) over `batches`, its perplexity and the token count."""
    body, head = hidden_and_head(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        h = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].flatten()
        for start in range(0, targets.numel(), int(chunk_tokens)):
            logits = head(h[start:start + chunk_tokens]).float()
            total += F.cross_entropy(logits, targets[start:start + chunk_tokens], reduction="sum").item()
        count += targets.numel()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
