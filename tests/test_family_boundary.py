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


def family_names(path: Path) -> list[str]:
    """``file:line: name`` for each family-specific name in `path`'s code and string literals."""
    src = path.read_text()
    prose = _docstring_lines(ast.parse(src))
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE) or tok.start[0] in prose:
            continue
        for i, line in enumerate(tok.string.splitlines() or [""]):
            for m in FORBIDDEN.finditer(ALLOWED.sub(" ", line)):
                hits.append(f"{path.relative_to(ROOT)}:{tok.start[0] + i}: {m.group(0)}")
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
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        hits = family_names(f)
    finally:
        ROOT = root
    assert [h.split(": ")[1] for h in hits] == ["backbone", "nemotron_h", "num_key_value_heads", "NemotronHConfig"]
    assert [int(h.split(":")[1]) for h in hits] == [2, 3, 4, 8]


@pytest.mark.parametrize("path", CORE, ids=[str(p.relative_to(ROOT)) for p in CORE])
def test_core_module_names_no_family(path):
    hits = family_names(path)
    assert not hits, ("family-specific names outside elastic/models/ (reach them through "
                      "elastic.models.family_for):\n" + "\n".join(hits))
