"""The NemotronH family (hybrid Mamba-2 / MLP / attention, transformers' `NemotronHForCausalLM`): its interface.

The family is this package; each module holds one role and imports only the ones above it in this
list (never this ``__init__``, which imports them all):

* `sizes`    -- `Sizes` (exact parameter count, memory, config export), the layer-pattern helpers,
  `make_arch`: the closed forms;
* `surgery`  -- `decoder_layers` / `set_decoder_layers`, the importance hooks `width_hooks`, the
  physical slice `slice_model` (all index math);
* `masking`  -- `Elastic`, the masked forward the router trains (hard mask == slice);
* `plan`     -- the training memory / FLOP model `elastic.plan` asks for (`plan_model`);
* `export`   -- export facts: hub names, the config llama.cpp's converter needs (`export_facts`);
* `kernels`  -- which Mamba-2 scan transformers will run.

Core code reaches the family only through the registry (`elastic.models.family_for`); tests and
scripts may import this package directly.
"""

from __future__ import annotations

from elastic.models.nemotron_h import export as export_facts  # hub names, llama.cpp config
from elastic.models.nemotron_h import kernels  # which Mamba-2 scan runs
from elastic.models.nemotron_h import plan as plan_model  # training memory / FLOP model
from elastic.models.nemotron_h.masking import ElasticNemotronH as Elastic
from elastic.models.nemotron_h.sizes import (CHAR_TO_LAYER_TYPE, LAYER_TYPE_TO_CHAR, MODEL_TYPES, Arch, Ranking, Sizes,
                                             arch_of, make_arch, pattern_to_types, types_to_pattern)
from elastic.models.nemotron_h.surgery import (EXPERT_SCORES, decoder_layers, expert_scores, set_decoder_layers,
                                               slice_model, width_hooks)

__all__ = ["MODEL_TYPES", "Sizes", "Arch", "Ranking", "arch_of", "make_arch", "pattern_to_types", "types_to_pattern",
           "LAYER_TYPE_TO_CHAR", "CHAR_TO_LAYER_TYPE", "decoder_layers", "set_decoder_layers", "width_hooks",
           "EXPERT_SCORES", "expert_scores", "slice_model", "Elastic", "export_facts", "kernels", "plan_model"]
