"""Tiny NemotronH models built from a config, for tests that need no trained weights."""

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM


def tiny_config(pattern: str = "M-*M-", **overrides) -> NemotronHConfig:
    kinds = {"M": "linear_attention", "-": "mlp", "*": "full_attention"}
    kw = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
        ssm_state_size=8, conv_kernel=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, chunk_size=16,
        layers_block_type=[kinds[c] for c in pattern], max_position_embeddings=1024,
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


def tokens(batch: int = 2, length: int = 24, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
