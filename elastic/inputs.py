"""Which text a stage reads, as token batches: the one place that maps `data.*` keys to tensors."""

from __future__ import annotations

from typing import Any

import torch

SPLITS = ("calib", "heldout", "train")

# the pipeline's held-out metric lives with the losses (the toy builder uses it without this module)
from elastic.losses import heldout_loss  # noqa: E402,F401


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


STREAM_SHUFFLE_BUFFER = 1000  # documents shuffled ahead when calibration / held-out rows are read from a stream


def _total_bytes(files) -> int | None:
    """Bytes of local files (a path, glob, directory or list of them); None for a `load_dataset` dict spec."""
    import os

    from elastic.data import _expand

    if isinstance(files, dict) or (hasattr(files, "keys") and not isinstance(files, str)):
        return None
    specs = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    return sum(os.path.getsize(p) for spec in specs for p in _expand(spec))


def token_rows(cfg: Any, tokenizer, split: str, *, num_sequences: int | None = None, seq_len: int | None = None) -> torch.Tensor:
    """Up to `num_sequences` (None = all) packed sequences of `split`, as one [N, seq_len] tensor.

    Files larger than ``data.in_memory_limit_mb`` in total are not tokenised whole to keep N rows: the
    rows are read from the front of a document-shuffled stream until N are packed (calibration of a 9B
    on 1k x 4K tokens reads ~4M tokens of a 1B-token corpus, not all of it).
    """
    from elastic.data import DataError, StreamingRows, load_text, pack_tokens, stream_text

    seq_len = int(seq_len or cfg.data.seq_len)
    files = data_files(cfg, split)
    limit = float(cfg.data.get("in_memory_limit_mb") or 0) * 2**20
    size = _total_bytes(files) if num_sequences is not None and limit > 0 else None
    if size is not None and size > limit:
        if _uses_fraction(cfg, split):
            raise DataError(f"data.files hold {size / 2**20:.0f} MiB, more than data.in_memory_limit_mb, so they are "
                            "streamed and the held-out share cannot be cut off their end: set data.heldout_files "
                            "(disjoint held-out text)")
        src = StreamingRows(stream_text(files, text_column=cfg.data.get("text_column", "text")), tokenizer, seq_len,
                            seed=int(cfg.seed), shuffle_buffer=STREAM_SHUFFLE_BUFFER, name=split)
        return torch.stack([src.row(j) for j in range(int(num_sequences))])
    ds = load_text(files, text_column=cfg.data.get("text_column", "text"))
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
# ------------------------------------------------------------------------------------------------ training streams
# The search and distill stages read their training text the same way, each from its own config section
# (`search.*` / `distill.*`): `sources` (a weighted mixture; null = the run's `data.files` alone, minus the
# held-out share), `streaming` (read sources as datasets streams instead of packing them in memory) and
# `shuffle_buffer` (documents shuffled ahead in a streamed source).


def training_sources(cfg: Any, section: str) -> list[dict]:
    """`<section>.sources` as plain dicts, or the run's training data (`data.files` / the toy plays) alone."""
    from omegaconf import OmegaConf

    from elastic.data import DataError

    raw = cfg[section].get("sources")
    if not raw:
        return [{"name": "train", "files": data_files(cfg, "train"), "weight": 1.0,
                 "text_column": cfg.data.get("text_column", "text"), "default": True}]
    out = []
    for i, s in enumerate(OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw):
        if not isinstance(s, dict) or not s.get("files"):
            raise DataError(f"{section}.sources[{i}] needs `files` (and optionally name, weight, text_column)")
        out.append({"name": s.get("name", f"source{i}"), "files": s["files"], "weight": float(s.get("weight", 1.0)),
                    "text_column": s.get("text_column", cfg.data.get("text_column", "text")), "default": False})
    return out


def stream_spec(cfg: Any, section: str, seq_len: int) -> dict:
    """What a training stream depends on: part of a stage's resume fingerprint."""
    from omegaconf import OmegaConf

    srcs = [{k: (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in s.items()}
            for s in training_sources(cfg, section)]
    return {"sources": srcs, "streaming": bool(cfg[section].get("streaming")), "seq_len": int(seq_len),
            "seed": int(cfg.seed)}


def training_stream(cfg: Any, tokenizer, section: str, seq_len: int, *, num_sequences: int | None = None):
    """The endless, resumable `Mixture` of `<section>`'s training sources at `seq_len`.

    In memory (the default), each source is packed up front and `num_sequences` (None = all) caps its
    rows; streamed (`<section>.streaming`), rows are packed on the fly and nothing is capped. Source i is
    shuffled with seed ``cfg.seed + i``. A source without enough text is a `DataError` now, not mid-run.
    """
    from elastic.data import DataError, Mixture, PackedRows, StreamingRows, load_text, pack_tokens, stream_text

    seed = int(cfg.seed)
    c = cfg[section]
    streaming = bool(c.get("streaming"))
    sources, weights = [], []
    for i, s in enumerate(training_sources(cfg, section)):
        if streaming and s["default"] and _uses_fraction(cfg, "train"):
            # a stream is read front to back, never packed whole, so the held-out tail of data.files
            # cannot be cut off: training would read the text the held-out scores are computed on
            raise DataError(f"{section}.streaming reads all of data.files, including the last "
                            f"data.heldout_fraction that is held out for scoring: set data.heldout_files "
                            f"(disjoint held-out text) or list the training text in {section}.sources")
        try:
            if streaming:
                src = StreamingRows(stream_text(s["files"], text_column=s["text_column"]), tokenizer, seq_len,
                                    seed=seed + i, shuffle_buffer=int(c.get("shuffle_buffer") or 0), name=s["name"])
                src.row(0)  # fail now, not mid-training, if the source holds no text
                src.load_state_dict({"epoch": 0, "docs": 0, "buffer": [], "produced": 0})
            else:
                if s["default"]:  # the project's convention (token_rows): user files minus the held-out share
                    rows = token_rows(cfg, tokenizer, "train", num_sequences=num_sequences, seq_len=seq_len)
                else:
                    rows = pack_tokens(load_text(s["files"], text_column=s["text_column"]), tokenizer, seq_len, seed=seed + i)
                    rows = rows if num_sequences is None else rows[:num_sequences]
                src = PackedRows(rows, seed=seed + i, name=s["name"])
        except DataError as e:
            raise DataError(f"{section} source {s['name']!r} at seq_len {seq_len}: {e}") from None
        sources.append(src)
        weights.append(s["weight"])
    return Mixture(sources, weights, seed=seed)
