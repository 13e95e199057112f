"""Logit distillation losses: forward KL(teacher || student) with a temperature, plus optional LM loss.

The reference formula, for one token with student logits ``s`` and teacher logits ``t`` over the
vocabulary, temperature ``T``::

    p = softmax(t / T)            q = softmax(s / T)
    KL(p || q) = sum_v p_v * (log p_v - log q_v)          (times T**2, Hinton's scaling)

``loss = (1 - lm_weight) * T**2 * mean_tokens(KL) + lm_weight * mean_tokens(CE(s, next token))``.
Minitron found logits-only distillation (``lm_weight=0``) best; ``lm_weight=1`` is plain LM training
(the baseline of ``benchmarks/distill_toy.md``).

Long contexts make the ``[tokens x vocab]`` logits the biggest tensors of a step (49K tokens x 131K
vocab x 4 bytes = 26 GB per sequence, twice for student and teacher, twice again for softmax and
its gradient). :func:`chunked_kd_loss` therefore takes the final hidden states and the two output
heads, and computes logits a chunk of tokens at a time inside ``torch.utils.checkpoint``: the
forward keeps only per-chunk scalars, the backward recomputes one chunk's logits at a time, so peak
memory is ``O(chunk x vocab)`` whatever the context length. :func:`kd_loss` is the unchunked
reference the tests compare it with.

:class:`KDStudent` puts the student's forward and the chunked loss into ONE ``nn.Module.forward``:
DDP and FSDP only see parameter uses that happen inside the wrapped module's forward (FSDP gathers
``lm_head`` there), so the loss must not read ``student.lm_head.weight`` from outside.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

__all__ = ["LossOutput", "kd_loss", "chunked_kd_loss", "next_token_labels", "KDStudent", "hidden_states"]


class LossOutput(NamedTuple):
    """``loss`` is what to backpropagate; ``kl`` and ``ce`` are detached token means for logging."""

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    tokens: int


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: position i predicts token i+1; the last position has none."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[..., :-1] = input_ids[..., 1:]
    return labels


def _check(temperature: float, lm_weight: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= lm_weight <= 1.0:
        raise ValueError(f"lm_weight must be in [0, 1], got {lm_weight}")


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over tokens of KL(softmax(t/T) || softmax(s/T)), in fp32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


def _combine(kl_sum, ce_sum, n_kl: int, n_ce: int, temperature: float, lm_weight: float) -> LossOutput:
    kl = kl_sum * (temperature**2) / max(n_kl, 1)
    ce = ce_sum / max(n_ce, 1)
    if lm_weight == 0.0:
        loss = kl
    elif lm_weight == 1.0:
        loss = ce
    else:
        loss = (1.0 - lm_weight) * kl + lm_weight * ce
    return LossOutput(loss, kl.detach(), ce.detach(), n_kl)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    lm_weight: float = 0.0,
) -> LossOutput:
    """Unchunked reference on full ``[..., seq, vocab]`` logits (materialises everything).

    ``teacher_logits`` may be None only when ``lm_weight == 1``. ``labels`` (``-100`` = ignore) are
    needed for the CE term; the KL covers every position.
    """
    _check(temperature, lm_weight)
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    n = s.shape[0]
    if lm_weight < 1.0:
        if teacher_logits is None:
            raise ValueError("teacher logits are needed unless lm_weight == 1")
        kl_sum = _kl_sum(s, teacher_logits.reshape(-1, vocab), temperature)
    else:
        kl_sum = s.new_zeros((), dtype=torch.float32)
    if labels is not None:
        flat = labels.reshape(-1)
        ce_sum = F.cross_entropy(s.float(), flat, ignore_index=IGNORE_INDEX, reduction="sum")
        n_ce = int((flat != IGNORE_INDEX).sum())
    else:
        if lm_weight > 0:
            raise ValueError("labels are needed when lm_weight > 0")
        ce_sum, n_ce = s.new_zeros((), dtype=torch.float32), 0
    return _combine(kl_sum, ce_sum, n, n_ce, temperature, lm_weight)


def _head(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, torch.Tensor):
        return head, None
    weight, bias = head
    return weight, bias


def _chunk_sums(s_h, s_w, s_b, t_h, t_w, t_b, labels, temperature: float, want_kl: bool, want_ce: bool):
    """(KL sum, CE sum) of one chunk; runs under checkpoint, so nothing of size vocab is kept."""
    s_logits = F.linear(s_h, s_w, s_b).float()
    zero = s_logits.new_zeros(())
    kl = zero
    if want_kl:
        with torch.no_grad():
            t_logits = F.linear(t_h, t_w, t_b).float()
        kl = _kl_sum(s_logits, t_logits, temperature)
    ce = F.cross_entropy(s_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") if want_ce else zero
    return kl, ce


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    student_head,
    teacher_head=None,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    lm_weight: float = 0.0,
    chunk_size: int = 1024,
    use_checkpoint: bool = True,
) -> LossOutput:
    """:func:`kd_loss` of ``student_head(student_hidden)`` vs ``teacher_head(teacher_hidden)``, chunked.

    ``*_hidden`` are final (post-norm) hidden states ``[..., seq, hidden]`` (student and teacher may
    have different hidden sizes); ``*_head`` an ``nn.Linear``, a weight tensor, or ``(weight, bias)``.
    Tokens are flattened and processed ``chunk_size`` at a time; with ``use_checkpoint`` the
    backward recomputes each chunk's logits instead of keeping them. The teacher side never builds
    a graph. The CE term is computed whenever ``labels`` are given. Equal to :func:`kd_loss` up to
    float summation order.
    """
    _check(temperature, lm_weight)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    want_kl = lm_weight < 1.0
    want_ce = labels is not None  # computed for logging even at lm_weight 0
    if want_kl and (teacher_hidden is None or teacher_head is None):
        raise ValueError("teacher hidden states and head are needed unless lm_weight == 1")
    if lm_weight > 0 and labels is None:
        raise ValueError("labels are needed when lm_weight > 0")
    s_w, s_b = _head(student_head)
    s_h = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = s_h.shape[0]
    if want_kl:
        t_w, t_b = _head(teacher_head)
        t_h = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        if t_h.shape[0] != n:
            raise ValueError(f"student has {n} tokens, teacher {t_h.shape[0]}")
    else:
        t_w = t_b = t_h = None
    flat_labels = labels.reshape(-1) if labels is not None else None
    if flat_labels is not None and flat_labels.shape[0] != n:
        raise ValueError(f"{flat_labels.shape[0]} labels for {n} tokens")

    kl_sum = s_h.new_zeros((), dtype=torch.float32)
    ce_sum = s_h.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_size):
        args = (
            s_h[i : i + chunk_size], s_w, s_b,
            t_h[i : i + chunk_size] if want_kl else None, t_w, t_b,
            flat_labels[i : i + chunk_size] if want_ce else None,
            temperature, want_kl, want_ce,
        )
        if use_checkpoint and torch.is_grad_enabled() and (s_h.requires_grad or s_w.requires_grad):
            kl, ce = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            kl, ce = _chunk_sums(*args)
        kl_sum = kl_sum + kl
        ce_sum = ce_sum + ce
    n_ce = int((flat_labels != IGNORE_INDEX).sum()) if flat_labels is not None else 0
    return _combine(kl_sum, ce_sum, n, n_ce, temperature, lm_weight)


def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states of a Hugging Face causal LM, without computing logits.

    ``use_cache=False`` always: NemotronH without attention layers fails with a cache, and training
    never wants one.
    """
    return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


class KDStudent(nn.Module):
    """A student causal LM whose ``forward`` returns the distillation loss (see the module docstring).

    ``forward(input_ids, teacher_hidden, teacher_head)`` -> :class:`LossOutput`. ``teacher_hidden``
    may be None when ``lm_weight == 1`` (plain LM training). Save the student itself
    (``unwrap(model).student.save_pretrained``); this wrapper owns no parameters of its own.
    """

    def __init__(self, student: nn.Module, *, temperature: float = 1.0, lm_weight: float = 0.0, chunk_size: int = 1024):
        super().__init__()
        _check(temperature, lm_weight)
        self.student = student
        self.temperature = temperature
        self.lm_weight = lm_weight
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, teacher_hidden: torch.Tensor | None = None, teacher_head=None,
                lm_weight: float | None = None) -> LossOutput:
        """``lm_weight`` overrides the configured weight for this call (evaluation asks for 0.5 to get both terms)."""
        lm_weight = self.lm_weight if lm_weight is None else lm_weight
        h = hidden_states(self.student, input_ids)
        labels = next_token_labels(input_ids) if lm_weight > 0 else None
        return chunked_kd_loss(
            h, teacher_hidden, self.student.get_output_embeddings(), teacher_head,
            labels=labels, temperature=self.temperature, lm_weight=lm_weight, chunk_size=self.chunk_size,
        )


def heldout_loss(model, batches: list[torch.Tensor], *, chunk_size: int = 1024) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` on `batches`.

    The logits are computed `chunk_size` tokens at a time from the final hidden states
    (`losses.chunked_kd_loss`), so ``[batch, seq, vocab]`` is never built: scoring 8 x 8K tokens of a
    131K-vocabulary model holds one 1K x 131K chunk instead of 32 GiB of fp32 logits.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    for ids in batches:
        ids = ids.to(device)
        out = chunked_kd_loss(hidden_states(model, ids), None, head, labels=next_token_labels(ids), lm_weight=1.0,
                              chunk_size=chunk_size)
        n = ids[:, 1:].numel()
        total += float(out.ce) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)
