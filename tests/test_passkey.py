"""The toy parent's training rows teach the evaluate stage's pass key: they carry its own needle and
question, the needle alone predicts the answer, and the prose around them is kept in order."""

import pytest
import torch

from elastic import toy
from elastic.evaluation.passkey import NEEDLE, QUESTION, key_words
from elastic.parent import load_tokenizer


@pytest.fixture(scope="module")
def tok(toy_parent):
    return load_tokenizer(toy_parent)


@pytest.mark.parametrize("seq_len", [64, 128])
def test_training_rows_ask_for_the_latest_needle(tok, seq_len):
    """Each spliced row keeps its length; needles and questions alternate, one pair per 32 tokens; each
    question is followed by its needle's key, a word the evaluation could pick; the rest is the row's prose."""
    passkeys = toy._Passkeys(tok, seed=0)
    words = set(key_words(tok))
    q = tok.encode(QUESTION, add_special_tokens=False)
    prose = tok.encode(open(toy.toy_files("train")[0]).read()[:30000], add_special_tokens=False)
    for start in range(0, 30 * seq_len, seq_len):
        text = prose[start:start + seq_len]
        row = passkeys.row(list(text))
        assert len(row) == seq_len
        kept, keys, i = [], [], 0
        while i < len(row):
            if row[i:i + len(q)] != q:
                kept.append(row[i])
                i += 1
                continue
            key = row[i + len(q)]
            if len(keys) % 2 == 0:  # a needle, written exactly as the evaluation writes it
                needle = tok.encode(NEEDLE.format(key=tok.decode([key])), add_special_tokens=False)
                assert row[i:i + len(needle)] == needle
                keys.append(key)
                i += len(needle)
            else:  # its question, answered with the latest needle's key
                assert key == keys[-1]
                keys.append(key)
                i += len(q) + 1
        assert len(keys) == 2 * (seq_len // 32) and set(keys) <= words
        assert kept == text[:len(kept)]


def test_mix_splices_about_the_asked_share_of_rows(tok):
    x = torch.randint(10, len(tok), (400, 64))
    mixed = toy._Passkeys(tok, seed=1).mix(x.clone(), 0.25)
    changed = (mixed != x).any(dim=1).float().mean().item()
    assert 0.18 < changed < 0.32
