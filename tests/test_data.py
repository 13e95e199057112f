"""elastic.data: loading text from files/globs/dirs/JSONL, clear errors, deterministic packing."""

import json

import pytest
import torch

from elastic.data import DataError, load_text, pack_tokens


class CharTokenizer:
    """A stand-in tokenizer (one id per character) so these tests need no trained vocabulary."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[1 + (ord(c) % 200) for c in t] for t in texts]}


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha " * 50)
    (d / "b.txt").write_text("bravo " * 50)
    (d / "sub" / "c.txt").write_text("charlie " * 50)
    (d / "blank.txt").write_text("  \n\n ")
    (d / "notes.bin").write_bytes(b"\x00\x01")  # unsupported suffix: ignored when scanning a directory
    return d


def test_glob_list_and_directory(corpus):
    assert load_text(str(corpus / "*.txt"))["text"] == ["alpha " * 50, "bravo " * 50]  # blank file dropped
    assert len(load_text([corpus / "a.txt", str(corpus / "sub" / "*.txt")])) == 2
    assert len(load_text(str(corpus / "**" / "*.txt"))) == 3
    assert len(load_text(corpus)) == 3
    assert load_text(corpus).column_names == ["text"]


def test_jsonl_with_text_column_and_mixed_types(corpus, tmp_path):
    f = tmp_path / "docs.jsonl"
    rows = [{"id": 1, "body": "first document"}, {"id": 2, "body": ""}, {"id": 3, "body": "third"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_text(str(f), text_column="body")
    assert ds.column_names == ["text"] and ds["text"] == ["first document", "third"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_text(str(f))
    mixed = load_text([str(f), str(corpus / "a.txt")], text_column="body")
    assert len(mixed) == 3


def test_parquet_and_dict_spec(tmp_path):
    import datasets

    pq = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"content": ["one", "  ", "two"]}).to_parquet(str(pq))
    assert load_text(str(pq), text_column="content")["text"] == ["one", "two"]
    spec = {"path": "parquet", "data_files": str(pq), "split": "train", "text_column": "content"}
    assert load_text(spec)["text"] == ["one", "two"]
    with pytest.raises(DataError, match="needs a split"):
        load_text({"path": "parquet", "data_files": str(pq), "split": None, "text_column": "content"})


def test_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(DataError, match="file not found: .*missing.txt"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"no files match .*\*\.jsonl"):
        load_text(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty.txt"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="no non-empty text in .*blank.txt"):
        load_text(str(tmp_path / "blank.txt"))
    (tmp_path / "x.docx").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type .docx"):
        load_text(str(tmp_path / "x.docx"))


def test_pack_tokens_shapes_eos_and_determinism(corpus):
    ds = load_text(corpus)
    tok = CharTokenizer()
    total = sum(len(t) + 1 for t in ds["text"])  # +1: one EOS after each document
    rows = pack_tokens(ds, tok, 32, seed=3)
    assert rows.dtype == torch.long and rows.shape == (total // 32, 32)
    assert (rows == tok.eos_token_id).sum() <= len(ds)
    assert torch.equal(rows, pack_tokens(ds, tok, 32, seed=3))
    assert not torch.equal(rows, pack_tokens(ds, tok, 32, seed=4))
    assert torch.equal(pack_tokens(ds, tok, 32, seed=3, max_sequences=5), rows[:5])
    # Same multiset of rows regardless of seed: shuffling only reorders.
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, pack_tokens(ds, tok, 32, seed=4).tolist()))
    assert (pack_tokens(ds, tok, 32, add_eos=False) != tok.eos_token_id).all()


def test_too_little_text_for_one_sequence(tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="fewer than one sequence of 64"):
        pack_tokens(load_text(str(tmp_path / "short.txt")), CharTokenizer(), 64)


def test_large_calibration_files_are_streamed_up_to_the_rows_needed(corpus, tmp_path):
    """Above data.in_memory_limit_mb, calibration reads a shuffled stream until N rows are packed (the
    corpus is never tokenised whole); a held-out share of streamed files is refused."""
    from omegaconf import OmegaConf

    from elastic.inputs import token_rows

    class CountingTokenizer(CharTokenizer):
        docs = 0

        def __call__(self, texts, **kw):
            CountingTokenizer.docs += len(texts)
            return super().__call__(texts, **kw)

    many = tmp_path / "many"
    many.mkdir()
    for i in range(200):
        (many / f"d{i:03d}.txt").write_text(f"document {i} " * 40)
    cfg = OmegaConf.create({"seed": 0, "parent": {"path": "x"}, "data": {
        "files": str(many / "*.txt"), "heldout_files": str(corpus / "a.txt"), "text_column": "text", "seq_len": 16,
        "heldout_fraction": 0.1, "in_memory_limit_mb": 0.01}})
    tok = CountingTokenizer()
    rows = token_rows(cfg, tok, "calib", num_sequences=5)
    assert rows.shape == (5, 16)
    assert CountingTokenizer.docs < 100  # read only about what 5 rows need (~520 tokens a document), not 200 files
    everything = token_rows(OmegaConf.merge(cfg, {"data": {"in_memory_limit_mb": 0}}), tok, "calib", num_sequences=5)
    assert everything.shape == (5, 16) and CountingTokenizer.docs >= 200  # in memory: the whole corpus
    cfg.data.heldout_files = None
    with pytest.raises(DataError, match="heldout_files"):
        token_rows(cfg, tok, "calib", num_sequences=5)
