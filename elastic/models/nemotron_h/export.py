"""NemotronH facts for exports: the hub's module names and the config llama.cpp's converter expects.

- transformers 5.x renames the hub's ``backbone.`` prefix to ``model.`` on load; engines (vLLM,
  TensorRT-LLM) read the hub's names, so an export must carry ``backbone.`` (`MEMORY_PREFIX`,
  `HUB_PREFIX`; `elastic.export_check` flags in-memory names).
- transformers 5.x writes every NemotronH config with its MoE defaults (``num_experts_per_tok``, ...)
  and a ``layers_block_type`` list; llama.cpp's converter takes any config with ``num_experts_per_tok``
  for ``nemotron_h_moe`` and llama.cpp then fails to load a dense model. `llama_cpp_config` writes the
  config the way NVIDIA's released checkpoints do (``hybrid_override_pattern``, ``num_hidden_layers``,
  no MoE keys for a dense model), which transformers reads to the same model. The converter reads
  configs through ``AutoConfig``, which puts the MoE defaults back (transformers 5.24), so it must be
  handed that config.json as written (`GGUF_CONFIG_AS_WRITTEN`), as its own fallback for unreadable
  configs does.
"""

from __future__ import annotations

import re
from typing import Any

MEMORY_PREFIX, HUB_PREFIX = "model.", "backbone."  # transformers' in-memory prefix, the hub's
GGUF_CONFIG_AS_WRITTEN = True  # the converter must read llama_cpp_config's output as written, not via AutoConfig

# NemotronH layer kinds as transformers 5.x lists them -> the hub's hybrid_override_pattern characters.
PATTERN_CHARS = {"linear_attention": "M", "mamba": "M", "mlp": "-", "full_attention": "*", "attention": "*", "moe": "E"}
# Keys transformers 5.x fills into every NemotronH config: they describe MoE layers (and their
# multi-token-prediction head), which a dense model does not have.
MOE_KEY = re.compile(r"^(n_routed_experts|n_shared_experts|num_experts_per_tok|moe_.*|routed_scaling_factor|"
                     r"n_group|topk_group|norm_topk_prob|num_nextn_predict_layers|output_router_logits|mtp_.*)$")


def llama_cpp_config(config: dict[str, Any]) -> dict[str, Any]:
    """A NemotronH config dict written the way NVIDIA's hub checkpoints are.

    ``layers_block_type`` becomes the ``hybrid_override_pattern`` string (``M`` Mamba-2, ``-`` MLP,
    ``*`` attention, ``E`` MoE) plus ``num_hidden_layers``, and a model without MoE layers loses the MoE
    keys transformers 5.x fills in; ValueError for layer kinds llama.cpp has no name for,
    and for a MoE model with dense MLP layers (llama.cpp's ``nemotron_h_moe`` has none).
    """
    out = dict(config)
    kinds = out.pop("layers_block_type", None)
    if kinds is None:
        pattern = out.get("hybrid_override_pattern")
        if not isinstance(pattern, str):
            raise ValueError("the NemotronH config has neither layers_block_type nor a hybrid_override_pattern string")
    else:
        unknown = sorted({k for k in kinds if k not in PATTERN_CHARS})
        if unknown:
            raise ValueError(f"layers_block_type holds layer kinds llama.cpp's NemotronH has no equivalent for: {unknown} "
                             f"(known: {sorted(PATTERN_CHARS)})")
        pattern = "".join(PATTERN_CHARS[k] for k in kinds)
    if "E" in pattern and "-" in pattern:
        # the converter takes a MoE model for llama.cpp's nemotron_h_moe, whose FFN layers are all MoE: it writes
        # a dense MLP layer with feed-forward length 0, and llama.cpp then loads that layer as a Mamba layer and fails
        raise ValueError(f"llama.cpp's nemotron_h_moe has no dense MLP layers ('-') beside MoE layers ('E'), and this "
                         f"model has both ({pattern}): it cannot be exported to GGUF")
    out["hybrid_override_pattern"] = pattern
    out["num_hidden_layers"] = len(pattern)
    if "E" not in pattern:
        out = {k: v for k, v in out.items() if not MOE_KEY.match(k)}
    return out
