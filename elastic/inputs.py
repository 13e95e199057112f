"""Which text a stage reads, as token batches: the one place that maps `data.*` keys to tensors."""

from __future__ import annotations

from typing import Any

import torch

SPLITS = ("calib", "heldout", "train")


def data_files(cfg: Any, split: str):
    """The files for `split`: the user's `data.files` / `data.heldout_files`, or the toy recipe's plays."""
    from elastic.data import DataError

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if split == "heldout" and cfg.data.get("heldout_files"):
        return cfg.data.heldout_files
    if cfg.data.get("files"):
        return cfg.data.files
    if not cfg.parent.get("path"):
        from elastic import toy

        return toy.toy_files(split)
    raise DataError("data.files is not set: point it at local text/JSONL files for calibration, e.g. data.files='corpus/*.jsonl'")


def _uses_fraction(cfg: Any, split: str) -> bool:
    """With one set of user files and no held-out files, the last `heldout_fraction` is held out."""
    return bool(cfg.data.get("files")) and not cfg.data.get("heldout_files") and split in ("calib", "heldout", "train")


def token_rows(cfg: Any, tokenizer, split: str, *, num_sequences: int | None = None, seq_len: int | None = None) -> torch.Tensor:
    """Up to `num_sequences` (None = all) packed sequences of `split`, as one [N, seq_len] tensor."""
    from elastic.data import DataError, load_text, pack_tokens

    seq_len = int(seq_len or cfg.data.seq_len)
    ds = load_text(data_files(cfg, split), text_column=cfg.data.get("text_column", "text"))
    seqs = pack_tokens(ds, tokenizer, seq_len, seed=int(cfg.seed))
    if _uses_fraction(cfg, split):
        n_held = max(1, int(round(len(seqs) * float(cfg.data.heldout_fraction))))
        if len(seqs) - n_held < 1:
            raise DataError(f"only {len(seqs)} sequences of {seq_len} tokens: too little text to hold some out")
        seqs = seqs[-n_held:] if split == "heldout" else seqs[:-n_held]
    return seqs if num_sequences is None else seqs[:num_sequences]


def token_batches(cfg: Any, tokenizer, split: str, *, num_sequences: int, batch_size: int, seq_len: int | None = None) -> list[torch.Tensor]:
    """`token_rows` as a list of [batch_size, seq_len] tensors."""
    return list(torch.split(token_rows(cfg, tokenizer, split, num_sequences=num_sequences, seq_len=seq_len), batch_size))


@torch.no_grad()
def heldout_loss(model, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` on `batches`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for ids in batches:
        ids = ids.to(device)
        logits = model(ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)
