"""Text and token pipeline: files -> ``datasets.Dataset`` -> packed ``[N, seq_len]`` token tensors.

Two composable steps:

* :func:`load_text` turns a file spec (glob, list of globs/paths, directory, or a ``load_dataset``
  dict spec) into a ``datasets.Dataset`` with a single ``text`` column and no empty rows.
  Plain-text files become ONE ROW PER FILE (``sample_by="document"``): a file is treated as one
  document, so :func:`pack_tokens` puts an EOS between files, never inside a file.
* :func:`pack_tokens` tokenizes a Dataset, joins the documents with EOS, cuts the stream into
  fixed-length rows and shuffles them deterministically.

Training reads endless, resumable streams of packed rows built on those: :class:`PackedRows` (an
in-memory tensor, reshuffled per epoch), :class:`StreamingRows` (a corpus too large for memory, read
with :func:`stream_text`) and :class:`Mixture` (several sources interleaved by weight); each position
is a small ``state_dict``, so a resumed run reads the rows it would have read.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

__all__ = ["DataError", "load_text", "pack_tokens", "TEXT_SUFFIXES"]

# Suffix -> `load_dataset` builder name. Anything else is refused rather than guessed.
TEXT_SUFFIXES: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}

_GLOB_CHARS = set("*?[")


class DataError(ValueError):
    """Bad data input: a missing path, a glob that matches nothing, or no usable text."""


def _expand(spec: str | os.PathLike) -> list[str]:
    """Resolve one path, directory or glob to a sorted list of supported files."""
    s = os.path.expanduser(os.fspath(spec))
    if os.path.isdir(s):
        found = [
            str(p)
            for p in sorted(Path(s).rglob("*"))
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
        ]
        if not found:
            raise DataError(f"directory {s} contains no {'/'.join(sorted(TEXT_SUFFIXES))} files")
        return found
    if os.path.isfile(s):  # before globbing: "a[1].txt" may be a real name
        return [s]
    if _GLOB_CHARS & set(s):
        found = sorted(p for p in glob.glob(s, recursive=True) if os.path.isfile(p))
        if not found:
            raise DataError(f"no files match {s}")
        return found
    raise DataError(f"file not found: {s}")


def _only_text(ds: datasets.Dataset, text_column: str, where: str) -> datasets.Dataset:
    """Keep just ``text_column`` (renamed to ``text``) so datasets from any source concatenate."""
    if text_column not in ds.column_names:
        raise DataError(f"{where} has no column {text_column!r} (columns: {ds.column_names})")
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def _load_files(paths: list[str], text_column: str) -> datasets.Dataset:
    """Load local files, one ``load_dataset`` call per builder, and concatenate in path order."""
    by_builder: dict[str, list[str]] = {}
    for p in paths:
        builder = TEXT_SUFFIXES.get(Path(p).suffix.lower())
        if builder is None:
            raise DataError(f"unsupported file type {Path(p).suffix or '(none)'}: {p} "
                            f"(supported: {' '.join(sorted(TEXT_SUFFIXES))})")
        by_builder.setdefault(builder, []).append(p)

    parts = []
    for builder, files in by_builder.items():
        # Empty files make some builders (json, parquet) fail outright; they hold no text anyway.
        files = [f for f in files if os.path.getsize(f) > 0]
        if not files:
            continue
        kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        except Exception as e:  # surface the path; the original error stays chained
            raise DataError(f"could not read {where}: {type(e).__name__}: {e}") from e
        # Plain text always lands in a "text" column, whatever the caller named theirs.
        parts.append(_only_text(ds, "text" if builder == "text" else text_column, where))
    if not parts:
        raise DataError(f"all files are empty: {_describe(paths)}")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_spec(spec: Mapping[str, Any], text_column: str) -> datasets.Dataset:
    """Pass a hub-style dict spec to ``load_dataset`` (works offline for what is cached)."""
    kwargs = dict(spec)
    text_column = kwargs.pop("text_column", text_column)
    kwargs.setdefault("split", "train")
    where = str(kwargs.get("path", kwargs))
    try:
        ds = datasets.load_dataset(**kwargs)
    except Exception as e:
        raise DataError(f"could not load dataset {where}: {type(e).__name__}: {e}") from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DataError(f"dataset {where} needs a split, one of {list(ds)}")
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"dataset {where} is streaming; load_text needs a map-style dataset")
    return _only_text(ds, text_column, f"dataset {where}")


def _describe(paths: Sequence[str]) -> str:
    """Short human description of a list of paths for error messages."""
    return paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more)"


def load_text(
    files: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any],
    *,
    text_column: str = "text",
) -> datasets.Dataset:
    """Load text into a Dataset with one ``text`` column and no blank rows.

    ``files`` is a path, a glob (``**`` allowed), a directory (searched recursively for
    supported suffixes), a list of those, or a dict spec passed to ``datasets.load_dataset``
    (``{"path": ..., "name": ..., "split": ..., "text_column": ...}``; split defaults to
    ``train``). ``.txt``/``.md`` files give one row per file; ``.json``/``.jsonl``/``.parquet``/
    ``.csv`` give one row per record, read from ``text_column``. Raises :class:`DataError`
    naming the path when something is missing or no text is left.
    """
    if isinstance(files, Mapping):
        ds = _load_spec(files, text_column)
        where = str(files.get("path", files))
    else:
        specs = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not specs:
            raise DataError("no files given")
        paths = list(dict.fromkeys(p for s in specs for p in _expand(s)))  # dedupe, keep order
        ds = _load_files(paths, text_column)
        where = _describe(paths)
    ds = ds.filter(lambda t: isinstance(t, str) and bool(t.strip()), input_columns="text")
    if len(ds) == 0:
        raise DataError(f"no non-empty text in {where}")
    return ds


def pack_tokens(
    dataset: datasets.Dataset | Sequence[str],
    tokenizer,
    seq_len: int,
    *,
    max_sequences: int | None = None,
    seed: int = 0,
    add_eos: bool = True,
    text_column: str = "text",
) -> torch.LongTensor:
    """Tokenize, concatenate and cut text into a shuffled ``LongTensor[N, seq_len]``.

    Documents are tokenized without the tokenizer's own special tokens and joined with
    ``tokenizer.eos_token_id`` after each one (``add_eos``); the trailing partial row is dropped.
    Rows are shuffled with a generator seeded by ``seed`` (same inputs + seed -> same tensor),
    then truncated to ``max_sequences``. Raises :class:`DataError` if not even one full row fits.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not isinstance(dataset, datasets.Dataset):
        dataset = datasets.Dataset.from_dict({text_column: list(dataset)})
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise DataError("tokenizer has no eos_token_id; set one or pass add_eos=False")

    def _tok(texts: list[str]) -> dict[str, list[list[int]]]:
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids] if add_eos else ids}

    # keep_in_memory: hashing a tokenizer for the on-disk cache is slow and the result is cheap.
    tok = dataset.map(
        _tok,
        batched=True,
        input_columns=text_column,
        remove_columns=dataset.column_names,
        keep_in_memory=True,
        desc="tokenize",
    )
    if tok._indices is not None:
        tok = tok.flatten_indices(keep_in_memory=True)
    # Flatten through Arrow: a Python list of ints would cost ~30x the memory of the tensor.
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in tok.data.column("input_ids").chunks]
    flat = torch.from_numpy(np.concatenate(chunks).astype(np.int64, copy=False) if chunks
                            else np.zeros(0, dtype=np.int64))
    total = flat.numel()
    n = total // seq_len
    if n < 1:
        raise DataError(f"only {total} tokens, fewer than one sequence of {seq_len}")
    rows = flat[: n * seq_len].view(n, seq_len)
    g = torch.Generator().manual_seed(seed)
    rows = rows[torch.randperm(n, generator=g)]
    if max_sequences is not None:
        rows = rows[:max_sequences]
    return rows.contiguous()


# ------------------------------------------------------------------------------------------------
# Training streams: weighted mixtures of sources, in memory or streamed (added for the distill and
# search stages). A source is an endless sequence of packed rows addressed by a row index; a
# `Mixture` interleaves several sources by weight. Everything is a function of the seed, and the
# whole position fits in a small `state_dict`, so a resumed run reads exactly the rows it would
# have read had it not stopped.


class PackedRows:
    """An endless stream over an in-memory ``[N, seq_len]`` tensor, reshuffled every epoch.

    Row ``j`` is ``rows[perm_e[j % N]]`` with ``e = j // N`` and ``perm_e`` drawn from a generator
    seeded with ``seed + e``: random access, so the position is just the row index.
    """

    streaming = False

    def __init__(self, rows: torch.Tensor, *, seed: int = 0, name: str = "rows"):
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise DataError(f"source {name!r} has no packed rows (shape {tuple(rows.shape)})")
        self.rows, self.seed, self.name = rows, seed, name
        self._epoch, self._perm = -1, None

    @property
    def seq_len(self) -> int:
        return self.rows.shape[1]

    def row(self, j: int) -> torch.Tensor:
        epoch, i = divmod(j, self.rows.shape[0])
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.rows.shape[0], generator=g)
        return self.rows[self._perm[i]]

    def skip_to(self, j: int) -> None:  # random access: nothing to read ahead
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def stream_text(
    files: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any],
    *,
    text_column: str = "text",
) -> datasets.IterableDataset:
    """Like :func:`load_text`, but a streaming ``datasets.IterableDataset`` (nothing is loaded up front).

    Accepts the same specs; a dict spec is passed to ``load_dataset(..., streaming=True)``. Blank
    rows are not filtered here: :class:`StreamingRows` skips them as it reads.
    """
    if isinstance(files, Mapping):
        kwargs = dict(files)
        text_column = kwargs.pop("text_column", text_column)
        kwargs.setdefault("split", "train")
        where = str(kwargs.get("path", kwargs))
        try:
            ds = datasets.load_dataset(**kwargs, streaming=True)
        except Exception as e:
            raise DataError(f"could not stream dataset {where}: {type(e).__name__}: {e}") from e
        if not isinstance(ds, datasets.IterableDataset):
            raise DataError(f"dataset {where} needs a split")
        parts = [(ds, text_column, where)]
    else:
        specs = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not specs:
            raise DataError("no files given")
        paths = list(dict.fromkeys(p for s in specs for p in _expand(s)))
        by_builder: dict[str, list[str]] = {}
        for p in paths:
            builder = TEXT_SUFFIXES.get(Path(p).suffix.lower())
            if builder is None:
                raise DataError(f"unsupported file type {Path(p).suffix or '(none)'}: {p}")
            if os.path.getsize(p) > 0:
                by_builder.setdefault(builder, []).append(p)
        if not by_builder:
            raise DataError(f"all files are empty: {_describe(paths)}")
        parts = []
        for builder, fs in by_builder.items():
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=fs, split="train", streaming=True, **kwargs)
            except Exception as e:
                raise DataError(f"could not stream {_describe(fs)}: {type(e).__name__}: {e}") from e
            parts.append((ds, "text" if builder == "text" else text_column, _describe(fs)))
    out = []
    for ds, col, where in parts:
        if ds.column_names is not None and col not in ds.column_names:
            raise DataError(f"{where} has no column {col!r} (columns: {ds.column_names})")
        ds = ds.select_columns([col])
        if col != "text":
            ds = ds.rename_column(col, "text")
        out.append(ds)
    return out[0] if len(out) == 1 else datasets.concatenate_datasets(out)


class StreamingRows:
    """Rows packed on the fly from a streaming dataset, for corpora larger than memory.

    Documents are read in order (per epoch shuffled with a ``shuffle_buffer`` seeded by
    ``seed + epoch``; 0 = file order), tokenized as :func:`pack_tokens` does (no special tokens, EOS
    after each document) and cut into ``seq_len`` rows. Rows are produced by reading forward, so
    :meth:`row` must be asked for non-decreasing indices (each training process reads every row
    and keeps its own share). The state is (epoch, documents read, leftover tokens, and the dataset's
    own position when it can give one): a resumed run never tokenizes the documents already read, and
    an unshuffled stream restores the dataset's state (`IterableDataset.load_state_dict`), which jumps
    to the file it was reading instead of reading every earlier file again. A shuffled stream skips
    ``docs`` documents instead (a restored dataset state would lose the shuffle buffer's contents).
    """

    streaming = True
    DOCS_PER_READ = 16  # documents tokenized per tokenizer call

    def __init__(self, dataset: datasets.IterableDataset, tokenizer, seq_len: int, *, seed: int = 0,
                 shuffle_buffer: int = 0, add_eos: bool = True, name: str = "stream"):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.dataset, self.tokenizer, self._seq_len = dataset, tokenizer, seq_len
        self.seed, self.shuffle_buffer, self.add_eos, self.name = seed, shuffle_buffer, add_eos, name
        if add_eos and tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no eos_token_id; set one or pass add_eos=False")
        self._reset(epoch=0, docs=0, buffer=[], produced=0)

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def _reset(self, *, epoch: int, docs: int, buffer: list[int], produced: int, dataset_state: dict | None = None) -> None:
        self.epoch, self.docs, self.buffer, self.produced = epoch, docs, list(buffer), produced
        self._it = None
        self._live: datasets.IterableDataset | None = None  # the dataset being iterated (its state_dict is the position)
        self._resume_state = dataset_state
        self._last: tuple[int, torch.Tensor] | None = None

    def _open(self) -> Iterator[dict]:
        import copy

        ds = self.dataset
        if self.shuffle_buffer > 0:
            ds = ds.shuffle(seed=self.seed + self.epoch, buffer_size=self.shuffle_buffer)
        if self.docs and self.shuffle_buffer == 0 and self._resume_state is not None:
            ds = copy.deepcopy(ds)  # load_state_dict changes the dataset object; the next epoch starts clean
            ds.load_state_dict(self._resume_state)
        elif self.docs:
            ds = ds.skip(self.docs)
        self._resume_state = None
        self._live = ds
        return iter(ds)

    def _fill(self) -> None:
        """Read documents until the buffer holds one full row (next epoch when one runs out)."""
        eos = self.tokenizer.eos_token_id
        empty_epochs = 0
        while len(self.buffer) < self._seq_len:
            if self._it is None:
                self._it = self._open()
            texts, n_read = [], 0
            for ex in self._it:
                n_read += 1
                t = ex["text"]
                if isinstance(t, str) and t.strip():
                    texts.append(t)
                if len(texts) >= self.DOCS_PER_READ:
                    break
            if n_read == 0:  # end of the epoch
                if self.docs == 0 or empty_epochs:
                    raise DataError(f"streaming source {self.name!r} has no text")
                self.epoch, self.docs, self._it, self._live = self.epoch + 1, 0, None, None
                empty_epochs += 1
                continue
            self.docs += n_read
            if texts:
                empty_epochs = 0
                for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
                    self.buffer.extend(ids)
                    if self.add_eos:
                        self.buffer.append(eos)

    def _next(self) -> torch.Tensor:
        self._fill()
        out = torch.tensor(self.buffer[: self._seq_len], dtype=torch.long)
        del self.buffer[: self._seq_len]
        self.produced += 1
        return out

    def row(self, j: int) -> torch.Tensor:
        if self._last is not None and self._last[0] == j:
            return self._last[1]
        if j < self.produced:
            raise ValueError(f"streaming source {self.name!r} is at row {self.produced}; row {j} is behind it")
        while self.produced <= j:
            r = self._next()
        self._last = (j, r)
        return r

    def skip_to(self, j: int) -> None:
        """Read forward so that the next row produced is row ``j``."""
        while self.produced < j:
            self._next()

    def state_dict(self) -> dict:
        # the dataset's own position is exact only for an unshuffled stream (see the class docstring)
        live = self._live if self.shuffle_buffer == 0 and self._live is not None and self._it is not None else None
        ds_state = live.state_dict() if live is not None else self._resume_state
        return {"epoch": self.epoch, "docs": self.docs, "buffer": list(self.buffer), "produced": self.produced,
                "dataset": ds_state}

    def load_state_dict(self, state: dict) -> None:
        self._reset(epoch=int(state["epoch"]), docs=int(state["docs"]), buffer=state["buffer"],
                    produced=int(state["produced"]), dataset_state=state.get("dataset"))


class Mixture:
    """A deterministic weighted interleaving of row sources (e.g. 70% post-training, 30% pretraining).

    Global row ``k`` comes from source ``choice(k)``, drawn with the weights from a generator seeded
    by ``(seed, k // BLOCK)``; it is that source's next unread row. :meth:`take` hands out the
    ``(source, row)`` addresses of the next ``n`` global rows (cheap: no tokens) and :meth:`fetch`
    materialises any subset, so each training process can fetch only its own share.
    """

    BLOCK = 4096

    def __init__(self, sources: Sequence, weights: Sequence[float] | None = None, *, seed: int = 0):
        if not sources:
            raise DataError("a mixture needs at least one source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise DataError(f"{len(weights)} weights for {len(sources)} sources")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"mixture weights must be >= 0 and not all 0, got {weights}")
        lens = {s.seq_len for s in sources}
        if len(lens) != 1:
            raise DataError(f"mixture sources have different row lengths {sorted(lens)}")
        self.sources = list(sources)
        self.probs = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seed = seed
        self.position = 0
        self.counts = [0] * len(sources)
        self._block: tuple[int, np.ndarray] | None = None

    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    def _choice(self, k: int) -> int:
        b, i = divmod(k, self.BLOCK)
        if self._block is None or self._block[0] != b:
            rng = np.random.default_rng([self.seed, b])
            self._block = (b, rng.choice(len(self.sources), size=self.BLOCK, p=self.probs))
        return int(self._block[1][i])

    def take(self, n: int) -> list[tuple[int, int]]:
        """Addresses ``(source, row)`` of the next ``n`` global rows; advances the position."""
        out = []
        for k in range(self.position, self.position + n):
            s = self._choice(k)
            out.append((s, self.counts[s]))
            self.counts[s] += 1
        self.position += n
        return out

    def fetch(self, addresses: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The rows at ``addresses`` as a ``LongTensor[len, seq_len]`` (streamed sources: in order)."""
        return torch.stack([self.sources[s].row(j) for s, j in addresses])

    def catch_up(self) -> None:
        """Bring streamed sources to the mixture's position (rows fetched by other processes included)."""
        for s, src in enumerate(self.sources):
            src.skip_to(self.counts[s])

    def state_dict(self) -> dict:
        self.catch_up()
        return {"position": self.position, "counts": list(self.counts),
                "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["counts"]) != len(self.sources):
            raise DataError(f"data state has {len(state['counts'])} sources, this mixture {len(self.sources)}")
        self.position = int(state["position"])
        self.counts = [int(c) for c in state["counts"]]
        for src, st in zip(self.sources, state["sources"]):
            src.load_state_dict(st)
