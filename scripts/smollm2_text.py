"""Text for the SmolLM2 benchmark, from what pip installs offline, and held-out perplexity.

Source: the 100 English Wikipedia articles (3.1 MB of text, CC-BY-SA) that gensim ships as test data,
stripped of wiki markup by gensim's own `filter_wiki`. SmolLM2 was trained on web text, so encyclopedic
prose is closer to its distribution than Shakespeare or 19th-century speeches, and a held-out perplexity
on it measures damage to what the model knows rather than a domain shift.

Split by ARTICLE, not by position: every 5th article (in dump order) is held out (20 articles), the other
80 are the calibration / training text. No article contributes to both, and the held-out articles are
never read by importance, calibration or distillation.

`write_splits(dir)` writes `train.jsonl` and `heldout.jsonl` ({"text": ...} per article), the form
elastic's stages read through `data.files=.../train.jsonl data.heldout_files=.../heldout.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

HELDOUT_EVERY = 5  # article i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1
MIN_CHARS = 2000  # shorter pages are redirects and stubs
# Reference sections are lists of stripped citations (lines of "* "): not prose.
_TAIL = re.compile(r"^==+\s*(References|External links|See also|Notes|Footnotes|Further reading|Bibliography)\s*==+", re.M)
DEFAULT_DATA_DIR = Path(os.environ.get("ELASTIC_CACHE", Path.home() / ".cache" / "elastic")) / "smollm2-data"


def wiki_dump() -> Path:
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install gensim (or bash scripts/install.sh --bench)")
    return path


def clean(markup: str) -> str:
    """Article prose: gensim's markup filter, then bold/italic quotes, list-only lines and reference tails removed."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    m = _TAIL.search(text)
    if m:
        text = text[: m.start()]
    text = re.sub(r"'{2,}", "", text)
    text = "\n".join(line.rstrip() for line in text.splitlines() if line.strip(" *#:;"))
    return text.strip()


def articles() -> list[tuple[str, str]]:
    """(title, text) of every real article in the dump, in dump order."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages

    out = []
    with bz2.BZ2File(wiki_dump()) as f:
        for title, markup, _pageid in extract_pages(f):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean(markup)
            if len(text) >= MIN_CHARS:
                out.append((title, text))
    return out


def write_splits(out: str | Path = DEFAULT_DATA_DIR) -> dict[str, Path]:
    """{'train': train.jsonl, 'heldout': heldout.jsonl} under `out` (written once, atomically per file)."""
    out = Path(out).expanduser()
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    if all(p.is_file() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    arts = articles()
    split = {"train": [], "heldout": []}
    for i, (title, text) in enumerate(arts):
        split["heldout" if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"].append({"title": title, "text": text})
    for name, rows in split.items():
        tmp = paths[name].with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        os.replace(tmp, paths[name])
    return paths


def token_rows(tokenizer, path: str | Path, seq_len: int, num_rows: int | None = None) -> torch.Tensor:
    """The articles of `path` as one token stream (EOS between articles) cut into [N, seq_len] rows, in file order."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for line in Path(path).read_text().splitlines():
        ids.extend(tokenizer(json.loads(line)["text"], add_special_tokens=False).input_ids)
        ids.append(eos)
        if num_rows is not None and len(ids) >= num_rows * seq_len:
            break
    n = len(ids) // seq_len if num_rows is None else num_rows
    if n * seq_len > len(ids):
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than {num_rows} x {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def sample_rows(rows: torch.Tensor, num_rows: int, seed: int) -> torch.Tensor:
    """`num_rows` rows drawn without replacement by `seed` (calibration batches)."""
    if num_rows > len(rows):
        raise ValueError(f"asked for {num_rows} rows, only {len(rows)} exist")
    g = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(len(rows), generator=g)[:num_rows]]


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted token of `rows` (each row scored on its own)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size].to(model.device)
        logits = model(batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
