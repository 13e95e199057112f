"""Long-context retrieval: a pass key hidden in local text, found by likelihood.

Each trial is a haystack of held-out text with a needle ``" The key is <key>."`` inserted at a
relative `depth` (0 = start, 1 = just before the question), ending with the question
``" The key is"`` (the needle's tokens before the key); every prompt has exactly `length` tokens.
Keys are one-token words by default, or one-token digits (the usual pass-key test hides a number). A
trial draws `num_candidates` keys that do not occur in its haystack and builds one prompt per
candidate, each hiding that candidate as the key. With ``S[i, j]`` = log p(candidate j | prompt hiding candidate i), the model
retrieves key i when ``S[i, j] - mean_i' S[i', j]`` is largest at j = i: the needle must raise the
hidden word's probability above what the same word gets when another one is hidden.

Why likelihood, and why contrastive: a small model rarely generates a well-formed answer, and its
prior strongly prefers some words over others whatever the context. Subtracting each candidate's
mean score over the trial's prompts removes that prior exactly, so a model that ignores the needle
(a random one, or one that cannot carry the key that far) scores 1 / num_candidates in expectation:
the chance line of the plot. The cost is `num_candidates` forward passes per trial. The haystack is
the same text for every model, so models are compared on identical prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from elastic.evaluation.quality import hidden_and_head

NEEDLE = " The key is {key}."
KINDS = ("digits", "words")


@dataclass(frozen=True)
class Keys:
    """How pass keys are written for one tokenizer: every needle is ``prefix + [key] + suffix`` in ids,
    and the question is ``prefix``, so the answer is the next token after the question."""

    kind: str
    prefix: list[int]
    suffix: list[int]
    ids: list[int]


@dataclass(frozen=True)
class Trials:
    """All prompts of one (length, depth) cell: ids [n, k, length] (prompt j hides candidate j), candidates [n, k]."""

    length: int
    depth: float
    ids: torch.Tensor
    candidates: torch.Tensor


def key_words(tokenizer, limit: int = 2048) -> list[str]:
    """Whole words (3+ letters) that the tokenizer writes as one token after a space."""
    out = []
    for _, tid in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.decode([tid])
        word = text[1:] if text.startswith(" ") else ""
        if len(word) >= 3 and word.isalpha() and tokenizer.encode(text, add_special_tokens=False) == [tid]:
            out.append(word)
        if len(out) >= limit:
            break
    return out


def keys(tokenizer, kind: str = "words") -> Keys:
    """The pass keys of `kind`: "words" (one-token words) or "digits" (0-9, as in the usual pass-key test's numbers).

    A key counts only when its needle encodes as the shared prefix, the key as ONE token, and the shared
    suffix: then the question (the prefix) is the same tokens in every prompt and the key is scored as
    one next-token probability, however the tokenizer splits spaces and digits."""
    if kind not in KINDS:
        raise ValueError(f"evaluate.passkey.keys must be one of {KINDS}, got {kind!r}")
    texts = [str(d) for d in range(10)] if kind == "digits" else key_words(tokenizer)
    encoded = [tokenizer.encode(NEEDLE.format(key=t), add_special_tokens=False) for t in texts]
    lengths = [len(e) for e in encoded]
    n = max(set(lengths), key=lengths.count)  # the usual needle length: one-token keys
    usual = [e for e in encoded if len(e) == n]
    prefix = _common(usual)
    suffix = _common([e[::-1] for e in usual])[::-1]
    if len(prefix) + 1 + len(suffix) != n:
        raise ValueError(f"pass keys ({kind}): the needle {NEEDLE!r} does not split into one shared prefix, "
                         "a one-token key and one shared suffix with this tokenizer")
    ids = [e[len(prefix)] for e in usual if e[:len(prefix)] == prefix and e[len(prefix) + 1:] == suffix]
    return Keys(kind, prefix, suffix, list(dict.fromkeys(ids)))


def _common(rows: list[list[int]]) -> list[int]:
    """Longest common prefix of `rows`."""
    out = []
    for column in zip(*rows):
        if len(set(column)) > 1:
            break
        out.append(column[0])
    return out


def build_trials(pool: Keys, haystack: torch.Tensor, length: int, depth: float, n: int, num_candidates: int,
                 seed: int) -> Trials:
    """`n` prompts of `length` tokens with the needle at `depth`, reproducible from `seed`; `pool` is
    :func:`keys` of the model's tokenizer (computed once: it encodes a needle per candidate word)."""
    kind = pool.kind
    if len(pool.ids) < num_candidates:
        raise ValueError(f"the tokenizer writes only {len(pool.ids)} pass keys of kind {kind!r} as one token; "
                         f"passkey needs {num_candidates} (evaluate.passkey.candidates)")
    question = pool.prefix
    needle_len = len(pool.prefix) + 1 + len(pool.suffix)
    rng = random.Random(f"{seed}-{length}-{depth}")
    rows, cands = [], []
    fill = length - needle_len - len(question)
    if fill < 1:
        raise ValueError(f"passkey length {length} is shorter than the needle and question ({needle_len + len(question)} tokens)")
    if haystack.numel() < fill:
        raise ValueError(f"passkey length {length} needs {fill} tokens of haystack text; only {haystack.numel()} available")
    for _ in range(n):
        start = rng.randrange(haystack.numel() - fill + 1)
        hay = haystack[start:start + fill].tolist()
        # candidates never occur in the haystack: only the needle can tell the key apart
        present = set(hay)
        absent = [w for w in pool.ids if w not in present]
        if len(absent) < num_candidates:
            raise ValueError(f"passkey length {length}: fewer than {num_candidates} pass keys of kind {kind!r} are "
                             "absent from the haystack; use shorter contexts, fewer candidates or the other "
                             "evaluate.passkey.keys")
        choice = rng.sample(absent, num_candidates)
        at = round(depth * fill)
        prompts = [hay[:at] + pool.prefix + [key] + pool.suffix + hay[at:] + question for key in choice]
        rows.append(prompts)
        cands.append(choice)
    return Trials(length, depth, torch.tensor(rows), torch.tensor(cands))


@torch.no_grad()
def scores(model, trials: Trials, batch_size: int = 8) -> torch.Tensor:
    """S[t, i, j]: log-probability of candidate j as the next token of trial t's prompt hiding candidate i."""
    body, head = hidden_and_head(model)
    device = next(model.parameters()).device
    n, k, length = trials.ids.shape
    flat = trials.ids.reshape(n * k, length)
    cand = trials.candidates.repeat_interleave(k, dim=0)  # [n*k, k]
    out = []
    for s in range(0, n * k, batch_size):
        last = body(input_ids=flat[s:s + batch_size].to(device), use_cache=False).last_hidden_state[:, -1]
        logp = head(last).float().log_softmax(-1).cpu()
        out.append(logp.gather(1, cand[s:s + batch_size]))
    return torch.cat(out).reshape(n, k, k)


def accuracy(model, trials: Trials, batch_size: int = 8) -> float:
    """Share of prompts whose hidden key stands out most after removing each candidate's mean score."""
    s = scores(model, trials, batch_size)
    centred = s - s.mean(dim=1, keepdim=True)  # each candidate's prior, over the prompts of its trial
    k = s.shape[1]
    return (centred.argmax(-1) == torch.arange(k)).float().mean().item()


def evaluate(model, trial_sets: list[Trials], batch_size: int = 8) -> list[dict]:
    """One row per (length, depth): accuracy and the chance level."""
    return [{"length": t.length, "depth": t.depth, "accuracy": accuracy(model, t, batch_size),
             "trials": int(t.ids.shape[0]), "chance": 1.0 / t.candidates.shape[1]} for t in trial_sets]
