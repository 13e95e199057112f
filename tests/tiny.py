"""Tiny NemotronH models built from a config, for tests that need no trained weights.

Pattern letters as in hub configs' ``hybrid_override_pattern``: ``M`` Mamba-2, ``-`` MLP, ``*`` attention,
``E`` MoE (transformers' layer type "moe").
"""

from pathlib import Path

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

KINDS = {"M": "linear_attention", "-": "mlp", "*": "full_attention", "E": "moe"}
# A small MoE hybrid with every layer kind: routed experts stored as 3-D tensors (transformers 5.x
# NemotronHExperts), 8 of them, top-2, one shared expert, sigmoid router with a correction bias.
MOE_PATTERN = "ME*E-ME"
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
           moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1, norm_topk_prob=True,
           routed_scaling_factor=2.5)


def tiny_config(pattern: str = "M-*M-", **overrides) -> NemotronHConfig:
    kw = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
        ssm_state_size=8, conv_kernel=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, chunk_size=16,
        layers_block_type=[KINDS[c] for c in pattern], max_position_embeddings=1024,
    )
    kw.update(overrides)
    return NemotronHConfig(**kw)


def tiny_model(pattern: str = "M-*M-", seed: int = 0, **overrides) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(tiny_config(pattern, **overrides)).eval()
    # Random init leaves norms at 1 and Mamba biases uniform; perturb them so that a wrong index shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "dt_bias", "D", "A_log", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def tiny_moe_config(pattern: str = MOE_PATTERN, **overrides) -> NemotronHConfig:
    """`tiny_config` with MoE layers (`MOE` sizes; overrides win)."""
    return tiny_config(pattern, **(MOE | overrides))


def tiny_moe_model(pattern: str = MOE_PATTERN, seed: int = 0, **overrides) -> NemotronHForCausalLM:
    """A tiny MoE NemotronH (Mamba, MoE, attention and MLP layers), perturbed like `tiny_model`, and its routers
    too: at init a router scores every expert ~0.5 and its correction bias is zero, so a wrong expert index
    would not show."""
    model = tiny_model(pattern, seed, **(MOE | overrides))
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("gate.weight"):
                t.normal_(0.0, 0.3)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn_like(t))
    return model


def save_tiny_moe(out: str | Path, tokenizer_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny MoE parent checkpoint with the toy's tokenizer (vocabulary and special ids), for the stages."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_moe_model(seed=seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **overrides)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def tokens(batch: int = 2, length: int = 24, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
