"""Core modules reach a model family only through the registry (`elastic.models.family_for`).

Every module outside `elastic/models/` (the toy parent's builder `elastic/toy.py` aside) is read as
Python tokens and its code and string literals are searched for names that belong to one family:
transformers class names, the modules' attribute names (NemotronH's ``backbone`` / ``mixer`` /
``in_proj``, Llama's ``q_proj`` / ``gate_proj`` ...), config fields (``layers_block_type``,
``mamba_num_heads``, ``num_key_value_heads`` ...) and ``model_type`` values. Comments and docstrings
are prose and may name a family as an example; what runs may not. Tool names that merely contain a
family's name (``llama.cpp``, ``llama-quantize``, ``convert_hf_to_gguf``, the ``llama_cpp`` package)
are allowed explicitly. One test per file, so a failure lists that file's ``file:line`` hits.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p for pattern in ("elastic/*.py", "elastic/stages/*.py", "elastic/evaluation/*.py")
              for p in ROOT.glob(pattern) if p.name != "toy.py")

# family-specific names, each matched as a whole word (case-sensitive: `Mamba` in a log line is prose)
CLASSES = r"(NemotronH|Llama|Qwen[23]?|Mistral|Mamba2?)[A-Z]\w*|NemotronH"
MODULES = ("backbone", "mixer", "in_proj", "out_proj", "conv1d", "A_log", "dt_bias", "norm_f", "embeddings",
           "embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "input_layernorm", "post_attention_layernorm", "self_attn")
FIELDS = ("layers_block_type", "hybrid_override_pattern", "mamba_num_heads", "mamba_head_dim", "mamba_intermediate",
          "ssm_state_size", "n_groups", "conv_kernel", "mamba_chunk_size", "num_key_value_heads",
          "head_dim", "conv_dim", "rope_theta")
MODEL_TYPES = ("nemotron_h", "nemotron_h_moe", "llama", "qwen2", "qwen3", "mistral")
FORBIDDEN = re.compile(r"\b(?:%s)\b" % "|".join([CLASSES, *MODULES, *FIELDS, *MODEL_TYPES]))
# tool names that contain a family's name: removed from a line before it is searched
ALLOWED = re.compile(r"llama[.\-_]cpp\w*|llama-quantize|llama_(?:model|log|token)\w*|LLAMA_FTYPE_\w*|"
                     r"llama_cpp\.Llama\b|convert_hf_to_gguf\w*|\bquiet_llama\b|\brun_llama\b")


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def family_names(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: name`` for each family-specific name in `path`'s code and string literals."""
    src = path.read_text()
    prose = _docstring_lines(ast.parse(src))
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE) or tok.start[0] in prose:
            continue
        for i, line in enumerate(tok.string.splitlines() or [""]):
            for m in FORBIDDEN.finditer(ALLOWED.sub(" ", line)):
                hits.append(f"{path.relative_to(root)}:{tok.start[0] + i}: {m.group(0)}")
    return sorted(set(hits), key=lambda h: (int(h.split(":")[1]), h))


def test_the_search_finds_what_it_must_and_only_that(tmp_path):
    f = tmp_path / "core.py"
    f.write_text('"""Docstring naming NemotronH and its backbone."""\n'
                 "x = model.backbone.layers  # a comment naming mixer\n"
                 "if cfg['model_type'] == 'nemotron_h': pass\n"
                 "y = cfg.num_key_value_heads\n"
                 "import llama_cpp; llm = llama_cpp.Llama('f.gguf')  # llama.cpp\n"
                 "z = 'llama-quantize and llama.cpp'\n"
                 "mamba_path = 'kernel'\n"
                 "w = NemotronHConfig\n")
    hits = family_names(f, root=tmp_path)
    assert [h.split(": ")[1] for h in hits] == ["backbone", "nemotron_h", "num_key_value_heads", "NemotronHConfig"]
    assert [int(h.split(":")[1]) for h in hits] == [2, 3, 4, 8]


@pytest.mark.parametrize("path", CORE, ids=[str(p.relative_to(ROOT)) for p in CORE])
def test_core_module_names_no_family(path):
    hits = family_names(path)
    assert not hits, ("family-specific names outside elastic/models/ (reach them through "
                      "elastic.models.family_for):\n" + "\n".join(hits))


# ------------------------------------------------------------------------------------------------ a family without facts


@pytest.fixture
def bare_family(monkeypatch):
    """A registered family that declares none of the optional facts (no plan_model, export_facts, kernels)."""
    import sys
    import types

    from elastic import models

    monkeypatch.setitem(sys.modules, "bare_family", types.ModuleType("bare_family"))
    monkeypatch.setitem(models.FAMILIES, "bare", "bare_family")
    return "bare"


def _plan_cfg(tmp_path, config: dict):
    import json

    from hydra import compose, initialize_config_dir

    from elastic.run import CONF_DIR

    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps(config))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["recipe=nemotron_9b_to_4b", f"parent.path={parent}", "plan.mamba_path=kernel"])


def test_a_family_without_a_memory_model_is_refused_by_the_plan_and_left_unchecked_by_the_choices(tmp_path, bare_family):
    from elastic.plan import GiB, NoMemoryModel, PlanError, choose_strategy, choose_teacher, plan_all

    cfg = _plan_cfg(tmp_path, {"model_type": bare_family, "hidden_size": 64})
    with pytest.raises(NoMemoryModel, match="no memory model for model_type 'bare'") as e:
        plan_all(cfg)
    assert isinstance(e.value, PlanError) and isinstance(e.value, ValueError)  # one error line from elastic.run
    # with nothing to size against, auto keeps a full replica and a replicated teacher
    assert choose_strategy(cfg, "distill", 8, 80 * GiB) == "ddp"
    assert choose_teacher(cfg, "distill", 8, 80 * GiB, strategy="fsdp") == "replicate"


def test_the_export_facts_apply_only_to_the_family_that_declares_them(tmp_path, bare_family):
    import json

    import torch
    from safetensors.torch import save_file

    from elastic import kernels
    from elastic.export_check import check
    from elastic.gguf import hub_style_config

    kinds = {"layers_block_type": ["mamba", "mlp"], "num_experts_per_tok": 2}
    assert hub_style_config({"model_type": bare_family, **kinds}) == {"model_type": bare_family, **kinds}
    assert hub_style_config({"model_type": "nemotron_h", **kinds})["hybrid_override_pattern"] == "M-"
    assert kernels.describe({"model_type": bare_family}) is None
    assert kernels.describe({"model_type": "nemotron_h"}, "kernel").startswith("Mamba-2 scan")

    def problems(model_type):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        save_file({"model.layers.0.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
        return [p for p in check(folder) if "in-memory names" in p]

    # NemotronH's hub prefix is backbone.: transformers' in-memory model. names are flagged; a family
    # without export facts keeps its names as loaded
    flagged = problems("nemotron_h")
    assert len(flagged) == 1 and "'backbone.'" in flagged[0], flagged
    assert problems(bare_family) == []
