"""The Torch-Pruning baseline for the SmolLM2 benchmark: its LLM recipe at a given non-embedding parameter count.

The recipe is the one of Torch-Pruning's `examples/LLMs/prune_llm.py` (v1.6.1), re-written here:
`BasePruner` with local (per-layer) pruning at one ratio for the hidden size (the residual stream, hence
the embedding width too), the MLP channels and the attention heads; `num_heads` given for q/k/v so whole
query heads go, the same number in every KV group (GQA stays valid; KV heads are kept);
`prune_head_dims=False` (RoPE untouched); `lm_head` ignored as a root; `round_to=4`. Local pruning keeps
every layer the same width, so the result is a plain `LlamaConfig`. Importance: Torch-Pruning's
`GroupMagnitudeImportance(p=2)` (the recipe's) or `GroupTaylorImportance` (gradients of the LM loss on
calibration rows). The one knob, the pruning ratio, is bisected to land on the target count.

The pruned module tree is NOT what gets saved: Torch-Pruning edits tensors in place but leaves
`config.json` and attention attributes (`num_key_value_groups`) at the parent's values, and a
`save_pretrained` of it reloads as a different (or broken) model. Instead the config is derived from the
kept weights, the weights are loaded into a fresh `LlamaForCausalLM` of that config, and the saved folder
is reloaded and checked against the pruned module's logits.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch

IMPORTANCES = ("magnitude", "taylor")


def nonembed_params(model) -> int:
    """Parameters outside the token embedding and the LM head (tied or not)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in skip:
            seen.add(id(p))
            n += p.numel()
    return n


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown importance {kind!r}; use one of {IMPORTANCES}")


@contextlib.contextmanager
def _rope_hidden_from_tracing():
    """Trace the dependency graph without RoPE (Torch-Pruning 1.6.1 + transformers 5.x: upstream issue #527).

    On transformers 5.x Llama attention, `DependencyGraph` never finishes: its index mapping through
    `rotate_half`'s slice / negate / concatenate cycle loops forever (measured here: even a 1-layer,
    96-wide Llama hangs in `_fix_dependency_graph_non_recursive`). RoPE rotates pairs of dimensions
    inside a head; with `prune_head_dims=False` it couples nothing that pruning changes, so the graph is
    traced with it replaced by the identity, and the real function is back before any forward that counts
    (Taylor gradients, scoring).
    """
    from transformers.models.llama import modeling_llama

    real = modeling_llama.apply_rotary_pos_emb
    modeling_llama.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = real


def prune_in_memory(model, ratio: float, importance: str, calib: torch.Tensor | None = None, batch_size: int = 4):
    """Prune `model` in place with the recipe at `ratio`; returns it with config and attention attributes updated."""
    import torch_pruning as tp

    cfg = model.config
    # Head pruning is off: on transformers 5.x attention calls SDPA with the 3 KV heads un-repeated
    # (enable_gqa), Torch-Pruning 1.6.1 traces SDPA as an element-wise op that couples q_proj's 576 output
    # channels with k_proj's 192, and its head grouping then fails (`shape '[9, -1]' is invalid for input
    # of size 192`, measured on SmolLM2). So q/k/v are not pruning roots: every head is kept, the recipe
    # prunes the hidden size (their input channels too) and the MLP channels.
    attn = [m for layer in model.model.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)]
    example = torch.arange(1, 9).unsqueeze(0) % cfg.vocab_size  # any short input: used only to trace the graph
    with _rope_hidden_from_tracing():
        pruner = tp.pruner.BasePruner(
            model, example_inputs=example, importance=_importance(importance), global_pruning=False,
            output_transform=lambda out: out.logits, pruning_ratio=ratio, ignored_layers=[model.lm_head, *attn],
            # the recipe's round_to=4, made a multiple of the head count too: LlamaConfig refuses a hidden
            # size that is not a multiple of num_attention_heads (the README's "hard constraint" for HF format)
            round_to=math.lcm(4, cfg.num_attention_heads),
        )
    if importance == "taylor":
        if calib is None:
            raise ValueError("Taylor importance needs calibration rows")
        model.zero_grad()
        for i in range(0, len(calib), batch_size):
            batch = calib[i : i + batch_size]
            (model(batch, labels=batch).loss * len(batch) / len(calib)).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    del pruner
    # What the recipe updates by hand after pruning, read from the kept weights.
    a = model.model.layers[0].self_attn
    head_dim = a.head_dim
    cfg.hidden_size = model.model.embed_tokens.weight.shape[1]
    cfg.num_attention_heads = a.q_proj.out_features // head_dim
    cfg.num_key_value_heads = a.k_proj.out_features // head_dim
    cfg.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    cfg.head_dim = head_dim
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = cfg.num_attention_heads // cfg.num_key_value_heads
    return model


def config_from_weights(state: dict[str, torch.Tensor], parent_config):
    """A LlamaConfig whose sizes are read off the kept tensors; raises unless every layer has the same shape."""
    from transformers import LlamaConfig

    head_dim = parent_config.head_dim
    n = parent_config.num_hidden_layers
    shapes = {
        (state[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0], state[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0],
         state[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0], state[f"model.layers.{i}.input_layernorm.weight"].shape[0])
        for i in range(n)
    }
    if len(shapes) != 1:
        raise ValueError(f"layers were pruned to different shapes {sorted(shapes)}: not a plain LlamaConfig")
    q, k, inter, hidden = shapes.pop()
    if q % head_dim or k % head_dim or (q // head_dim) % (k // head_dim):
        raise ValueError(f"q/k widths {q}/{k} are not whole heads of {head_dim} in whole GQA groups")
    fields = parent_config.to_dict()
    fields.update(hidden_size=hidden, intermediate_size=inter, num_attention_heads=q // head_dim,
                  num_key_value_heads=k // head_dim, head_dim=head_dim)
    return LlamaConfig.from_dict(fields)


def save_plain(model, tokenizer, out: str | Path, *, check_rows: torch.Tensor | None = None) -> Path:
    """Write `model` (pruned) as a plain HF folder with a config derived from its weights; reload and compare logits."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from elastic.rundir import atomic_dir

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tied = bool(model.config.tie_word_embeddings)
    if tied and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        raise ValueError("pruning untied the embeddings: lm_head and embed_tokens now differ")
    config = config_from_weights(state, model.config)
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(state, strict=True)
    fresh.generation_config = model.generation_config
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
    if check_rows is not None:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        model.eval()
        with torch.no_grad():
            a, b = model(check_rows).logits, reloaded(check_rows).logits
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"reloaded {out} differs from the pruned model: {m}")
    return out


def ratio_for(parent, target_nonembed: int, *, tol: float = 0.005, iters: int = 10) -> tuple[float, int]:
    """(ratio, params) whose pruned non-embedding count is within `tol` of `target_nonembed`, by bisection.

    Sizes do not depend on the importance under local pruning (each layer keeps a fixed count), so the
    bisection prunes copies with magnitude importance (no gradients) and only counts.
    """
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = nonembed_params(prune_in_memory(copy.deepcopy(parent), mid, "magnitude"))
        if best is None or abs(n - target_nonembed) < abs(best[1] - target_nonembed):
            best = (mid, n)
        if abs(n - target_nonembed) <= tol * target_nonembed:
            break
        lo, hi = (mid, hi) if n > target_nonembed else (lo, mid)
    return best


_RATIOS: dict[tuple[str, int], tuple[float, int]] = {}  # (parent_dir, target) -> bisected (ratio, params), shared by both importances


def torch_pruning_method(importance: str):
    """A benchmark method (parent_dir, target_nonembed_params, calib, seed, out) -> pruned HF folder."""

    def method(parent_dir, target_nonembed_params: int, calib: torch.Tensor, seed: int, out: Path) -> Path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(parent_dir)
        key = (str(parent_dir), int(target_nonembed_params))
        if key not in _RATIOS:
            _RATIOS[key] = ratio_for(parent, target_nonembed_params)
        ratio = _RATIOS[key][0]
        model = prune_in_memory(parent, ratio, importance, calib)
        return save_plain(model, tok, out, check_rows=calib[:2, :64])

    method.__name__ = f"torch_pruning_{importance}"
    return method
