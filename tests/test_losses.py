"""Distillation losses: the chunked KL is the unchunked KL, in value and gradient, without its memory."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from elastic.losses import KDStudent, chunked_kd_loss, hidden_states, kd_loss, next_token_labels
from tiny import tiny_model, tokens


def _case(seed=0, b=2, t=37, hs=16, ht=24, v=50, bias=False):
    g = torch.Generator().manual_seed(seed)
    s_h = torch.randn(b, t, hs, generator=g, requires_grad=True)
    t_h = torch.randn(b, t, ht, generator=g)
    s_head = torch.nn.Linear(hs, v, bias=bias)
    t_head = torch.nn.Linear(ht, v, bias=bias)
    with torch.no_grad():
        for p in (*s_head.parameters(), *t_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    labels = next_token_labels(torch.randint(0, v, (b, t), generator=g))
    return s_h, t_h, s_head, t_head, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("lm_weight", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("chunk", [1, 7, 74, 1000])
def test_chunked_equals_unchunked_values_and_grads(temperature, lm_weight, chunk):
    s_h, t_h, s_head, t_head, labels = _case(bias=chunk == 7)
    params = (s_h, *s_head.parameters())
    ref = kd_loss(s_head(s_h), t_head(t_h), labels=labels, temperature=temperature, lm_weight=lm_weight)
    ref_grads = torch.autograd.grad(ref.loss, params)
    out = chunked_kd_loss(s_h, t_h, s_head, t_head, labels=labels, temperature=temperature, lm_weight=lm_weight,
                          chunk_size=chunk)
    grads = torch.autograd.grad(out.loss, params)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert_close(out.kl, ref.kl, rtol=1e-5, atol=1e-6)
    assert_close(out.ce, ref.ce, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert out.tokens == ref.tokens == s_h.shape[0] * s_h.shape[1]


def test_kl_matches_the_textbook_formula_and_is_zero_for_identical_logits():
    s_h, t_h, s_head, t_head, _ = _case()
    s, t = s_head(s_h).detach(), t_head(t_h).detach()
    p = F.softmax(t / 2, -1)
    manual = (p * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert_close(kd_loss(s, t, temperature=2.0).loss, manual, rtol=1e-5, atol=1e-6)
    same = chunked_kd_loss(t_h, t_h, t_head, t_head, chunk_size=5)
    assert same.loss.abs().item() < 1e-6


def test_lm_weight_one_is_the_hf_language_model_loss():
    model, ids = tiny_model(), tokens(length=20)
    hf = model(ids, labels=ids, use_cache=False).loss
    out = chunked_kd_loss(hidden_states(model, ids), None, model.lm_head, labels=next_token_labels(ids),
                          lm_weight=1.0, chunk_size=8)
    assert_close(out.loss, hf, rtol=1e-5, atol=1e-6)


def test_kd_student_forward_equals_the_reference_on_model_logits():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1, hidden_size=48)
    ids = tokens(length=20)
    ref = kd_loss(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits)
    with torch.no_grad():
        th = hidden_states(teacher, ids)
    out = KDStudent(student, chunk_size=9)(ids, th, teacher.lm_head.weight)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps between forward and backward while `fn` runs."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_chunked_loss_keeps_no_logits_for_backward():
    # What autograd keeps is the loss's share of peak memory that grows with context: with chunks
    # under checkpoint it is the chunk inputs (hidden states), never [tokens x vocab].
    hidden, vocab = 16, 2000
    head_s, head_t = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    saved = {}
    for t in (256, 1024):
        s_h = torch.randn(1, t, hidden, requires_grad=True)
        t_h = torch.randn(1, t, hidden)
        saved[t] = (
            _saved_bytes(lambda: chunked_kd_loss(s_h, t_h, head_s, head_t, chunk_size=64)),
            _saved_bytes(lambda: kd_loss(head_s(s_h), head_t(t_h))),
        )
    logits_bytes = 1024 * vocab * 4
    assert saved[1024][1] > 2 * logits_bytes            # the reference keeps several [tokens x vocab]
    assert saved[1024][0] < logits_bytes / 20           # the chunked loss keeps hidden-sized tensors only
    assert saved[1024][0] < 5 * saved[256][0]           # and those grow linearly with hidden, not vocab


def test_bad_arguments_are_refused():
    s_h, t_h, s_head, t_head, labels = _case()
    with pytest.raises(ValueError, match="lm_weight"):
        chunked_kd_loss(s_h, t_h, s_head, t_head, lm_weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        chunked_kd_loss(s_h, t_h, s_head, t_head, temperature=0)
    with pytest.raises(ValueError, match="teacher"):
        chunked_kd_loss(s_h, None, s_head)
    with pytest.raises(ValueError, match="labels"):
        chunked_kd_loss(s_h, t_h, s_head, t_head, lm_weight=0.5)


def test_chunked_heldout_loss_equals_the_unchunked_one():
    """Held-out scoring builds logits a chunk of tokens at a time; the loss is the full-logits one."""
    from elastic.inputs import heldout_loss
    from tiny import tiny_model, tokens

    model = tiny_model()
    batches = [tokens(2, 40), tokens(3, 40, seed=3)]
    total = count = 0.0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids, use_cache=False).logits.float()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
    for chunk in (7, 1024):
        assert heldout_loss(model, batches, chunk_size=chunk) == pytest.approx(total / count, rel=1e-6)


def test_chunked_depth_scores_equal_full_logits_ones():
    """Depth importance compares logits a chunk of tokens at a time; the scores are the full-logits ones."""
    from torch import nn

    from elastic.importance import depth_scores

    model = tiny_model("M-*M-")
    batches = [tokens(2, 30), tokens(2, 30, seed=4)]
    layers = model.model.layers
    mse, dloss = torch.zeros(len(layers)), torch.zeros(len(layers))
    with torch.no_grad():
        for ids in batches:
            full = model(ids, use_cache=False).logits.float()
            base = F.cross_entropy(full[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            for i in range(len(layers)):
                model.model.layers = nn.ModuleList([b for j, b in enumerate(layers) if j != i])
                skipped = model(ids, use_cache=False).logits.float()
                model.model.layers = layers
                mse[i] += (skipped - full).pow(2).mean() / full.pow(2).mean() / len(batches)
                dloss[i] += (F.cross_entropy(skipped[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) - base) / len(batches)
    got = depth_scores(model, batches, progress=False, chunk_size=7)
    assert_close(got["depth_mse"], mse, rtol=1e-4, atol=1e-6)
    assert_close(got["depth_loss"], dloss, rtol=1e-4, atol=1e-5)
    assert len(set(got["depth_mse"].tolist())) == len(layers)  # layers do differ: the test can fail
