"""Check an exported checkpoint folder the way a serving engine will read it.

    python -m elastic.export_check RUN/quantize/phase2-fp8          # exit 0: loadable as is
    python -m elastic.export_check RUN/prune/budget-0.5 RUN/distill/phase2

One line per problem and exit code 1, or one ``ok`` line per folder and exit code 0. Checked:

- every file is one a loader expects (`LOADER_FILES`): vLLM and TensorRT-LLM read every
  ``*.safetensors`` file of the folder as weights, so one of our own artifacts in there breaks them;
- ``config.json`` parses; the weight index names files that exist;
- for an FP8 export (NVIDIA Model Optimizer's format, as vLLM reads it): ``config.json`` has
  ``quantization_config`` with ``quant_method: modelopt`` and ``quant_algo: FP8`` and
  ``hf_quant_config.json`` agrees with it; every float8 weight has a positive ``weight_scale`` and
  ``input_scale``; every excluded module is stored unquantized; every other weight matrix is FP8
  (vLLM would build an FP8 layer for it); the exclusion lists name modules of the checkpoint only.

A plain BF16 export gets the file and config checks.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from pathlib import Path

from elastic.models import family_attr

# What a Hugging Face / vLLM / TensorRT-LLM loader reads from a checkpoint folder. Weights are
# `model.safetensors`, or the shards that `model.safetensors.index.json` lists; any other file in
# the folder is stray. The one definition the checker and the tests share.
CONFIG_FILES = frozenset({"config.json", "generation_config.json", "hf_quant_config.json"})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
})
WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
LOADER_FILES = CONFIG_FILES | TOKENIZER_FILES | {WEIGHTS_FILE, WEIGHTS_INDEX}

FP8_DTYPES = ("F8_E4M3",)  # safetensors' name of torch.float8_e4m3fn
SCALES = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")  # what modelopt's FP8 export adds to a module
# an input embedding, by the names transformers' families give it (embeddings, embed_tokens, embed_in, wte)
EMBEDDING = re.compile(r"(^|\.)(embed\w*|wte)$")


def weight_files(folder: Path) -> list[str]:
    """The weight files a loader reads: the index's shards, else `model.safetensors`."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    return [WEIGHTS_FILE] if (folder / WEIGHTS_FILE).is_file() else []


def stray_files(folder: str | Path) -> list[str]:
    """Names of the entries in `folder` that no loader expects (files of our own, folders, shards not indexed)."""
    folder = Path(folder)
    try:
        shards = set(weight_files(folder))
    except (OSError, json.JSONDecodeError):
        shards = set()
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                  if p.is_dir() or not (p.name in LOADER_FILES or p.name in shards))


def tensor_headers(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor name -> (safetensors dtype string such as F8_E4M3 / BF16 / F32, shape), from the headers only."""
    import struct

    out = {}
    for name in weight_files(folder):
        with open(folder / name, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        out.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def module_names(keys) -> set[str]:
    """Every module path that owns a tensor, with all its ancestors (``a.b.c.weight`` -> a, a.b, a.b.c)."""
    out = set()
    for k in keys:
        parts = k.split(".")[:-1]
        out.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return out


def names_a_module(entry: str, modules: set[str]) -> bool:
    """An exclusion entry names a module of the checkpoint: exactly, or as a wildcard that matches one."""
    if not isinstance(entry, str) or not entry or any(ord(c) < 32 for c in entry):
        return False
    return entry in modules or (any(c in entry for c in "*?[") and any(fnmatch.fnmatchcase(m, entry) for m in modules))


def excluded(module: str, patterns: list[str]) -> bool:
    """vLLM's rule (`ModelOptQuantConfigBase.is_layer_excluded`): an entry excludes a module it equals,
    is a substring of, or matches as a wildcard (``*`` spans dots)."""
    return any(module == e or e in module or fnmatch.fnmatchcase(module, e) for e in patterns)


def too_broad(entry: str, modules: set[str]) -> list[str]:
    """Modules an exclusion entry reaches in vLLM outside the subtree it names: ``backbone.layers.2``
    (by substring) or ``backbone.layers.2*`` (by wildcard) also exclude ``backbone.layers.20...``."""
    base = entry[:-1] if entry.endswith("*") and not entry.endswith(".*") else entry
    if any(c in base for c in "*?["):
        return []
    return sorted(m for m in modules if excluded(m, [entry]) and not (m == base or m.startswith(base + ".")))


def check(folder: str | Path) -> list[str]:
    """Problems of an exported folder, one readable line each (empty: loadable as is)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    problems = [f"stray file {name!r}: not a file a loader expects (our artifacts go beside the folder)"
                for name in stray_files(folder)]
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return problems + ["no config.json"]
    except json.JSONDecodeError as e:
        return problems + [f"config.json is not valid JSON: {e}"]
    try:
        shards = weight_files(folder)
    except json.JSONDecodeError as e:
        return problems + [f"{WEIGHTS_INDEX} is not valid JSON: {e}"]
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        return problems + [f"{WEIGHTS_INDEX} names missing weight files: {missing}"]
    if not shards:
        return problems + [f"no weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX})"]
    headers = tensor_headers(folder)
    dtypes = {k: d for k, (d, _) in headers.items()}
    facts = family_attr(config, "export_facts")
    if facts is not None and facts.HUB_PREFIX != facts.MEMORY_PREFIX:
        memory = sorted(k for k in dtypes if k.startswith(facts.MEMORY_PREFIX))
        if memory:  # transformers renames the hub's prefix on load; engines read the hub's names
            problems.append(f"{len(memory)} tensors use transformers' in-memory names instead of the hub's "
                            f"(e.g. {memory[0]!r}; the hub's prefix is {facts.HUB_PREFIX!r})")

    qcfg = config.get("quantization_config")
    hf_quant_file = folder / "hf_quant_config.json"
    fp8 = [k for k, d in dtypes.items() if d in FP8_DTYPES]
    if qcfg is None and not hf_quant_file.exists() and not fp8:
        return problems  # a plain export: nothing more to check
    return problems + _check_fp8(folder, qcfg, headers)


def _check_fp8(folder: Path, qcfg, headers: dict[str, tuple[str, list[int]]]) -> list[str]:
    dtypes = {k: d for k, (d, _) in headers.items()}
    problems = []
    if not isinstance(qcfg, dict):
        problems.append("config.json has no quantization_config: vLLM would load the FP8 weights as plain ones")
        qcfg = {}
    method, algo = str(qcfg.get("quant_method", "")), str(qcfg.get("quant_algo", ""))
    if qcfg and not method.lower().startswith("modelopt"):
        problems.append(f"config.json quantization_config.quant_method is {method!r}, not 'modelopt'")
    if qcfg and algo.upper() != "FP8":
        problems.append(f"config.json quantization_config.quant_algo is {algo!r}, not 'FP8'")
    ignore = qcfg.get("ignore", [])
    if not isinstance(ignore, list):
        problems.append("config.json quantization_config.ignore is not a list")
        ignore = []

    hf_quant_file = folder / "hf_quant_config.json"
    exclude, kv_algo = ignore, None
    if not hf_quant_file.exists():
        problems.append("no hf_quant_config.json (TensorRT-LLM and older vLLM read the quantization from it)")
    else:
        try:
            hq = json.loads(hf_quant_file.read_text()).get("quantization", {})
        except json.JSONDecodeError as e:
            hq = {}
            problems.append(f"hf_quant_config.json is not valid JSON: {e}")
        if str(hq.get("quant_algo", "")).upper() != "FP8":
            problems.append(f"hf_quant_config.json quantization.quant_algo is {hq.get('quant_algo')!r}, not 'FP8'")
        exclude = hq.get("exclude_modules", [])
        if not isinstance(exclude, list):
            problems.append("hf_quant_config.json quantization.exclude_modules is not a list")
            exclude = []
        if qcfg and sorted(map(str, exclude)) != sorted(map(str, ignore)):
            problems.append("hf_quant_config.json exclude_modules and config.json quantization_config.ignore differ")
        kv_algo = hq.get("kv_cache_quant_algo")
    kv_scheme = qcfg.get("kv_cache_scheme")
    if qcfg and bool(kv_algo) != bool(kv_scheme):
        problems.append(f"KV cache quantization disagrees: hf_quant_config.json says {kv_algo!r}, "
                        f"config.json kv_cache_scheme {kv_scheme!r}")
    if kv_algo and not any(k.endswith((".k_scale", ".v_scale")) for k in dtypes):
        problems.append(f"the KV cache is quantized ({kv_algo}) but no k_scale / v_scale tensor is stored")

    modules = module_names(dtypes)
    if json.loads((folder / "config.json").read_text()).get("tie_word_embeddings"):
        modules |= {"lm_head"}  # a tied head is a module with no tensor of its own in the files
    for where, entries in (("config.json quantization_config.ignore", ignore), ("hf_quant_config.json exclude_modules", exclude)):
        for e in entries:
            if not names_a_module(e, modules):
                problems.append(f"{where} lists {e!r}, which is no module of this checkpoint")
    entries = [e for e in ignore + exclude if names_a_module(e, modules)]
    owners = {k.rsplit(".", 1)[0] for k in dtypes if "." in k}
    for e in dict.fromkeys(entries):
        wide = too_broad(e, owners)
        if wide:
            problems.append(f"exclusion entry {e!r} also excludes {len(wide)} other modules in vLLM, which matches "
                            f"by substring and wildcard (e.g. {wide[0]!r}); name the modules, or use '<module>.*'")

    weights = {k[: -len(".weight")]: d for k, d in dtypes.items() if k.endswith(".weight")}
    for mod, d in sorted(weights.items()):
        if d in FP8_DTYPES:
            for s in ("weight_scale", "input_scale"):
                if f"{mod}.{s}" not in dtypes:
                    problems.append(f"{mod}.weight is FP8 but has no {s}")
            if excluded(mod, entries):
                problems.append(f"{mod} is excluded from quantization but its weight is FP8")
    for k, d in sorted(dtypes.items()):
        if k.endswith((".weight_scale", ".input_scale")):
            mod = k.rsplit(".", 1)[0]
            if weights.get(mod) not in FP8_DTYPES:
                problems.append(f"{k} scales a weight that is not FP8")
            elif d != "F32":
                problems.append(f"{k} is {d}, vLLM expects F32 scales")
    # a weight matrix stored unquantized but not excluded: vLLM would build an FP8 layer for it
    for mod, d in sorted(weights.items()):
        if d in FP8_DTYPES or len(headers[f"{mod}.weight"][1]) < 2 or EMBEDDING.search(mod):
            continue
        if not excluded(mod, entries):
            problems.append(f"{mod}.weight is {d} but {mod} is not in the exclusion lists: vLLM would load it as FP8")
    problems += _bad_scales(folder, dtypes)
    return problems


def _bad_scales(folder: Path, dtypes) -> list[str]:
    from safetensors import safe_open

    out = []
    for name in weight_files(folder):
        with safe_open(str(folder / name), "pt") as f:
            for k in f.keys():
                if k.endswith(SCALES) and dtypes.get(k) == "F32":
                    t = f.get_tensor(k)
                    if not (t.isfinite().all() and (t > 0).all()):
                        out.append(f"{k} is not a positive finite number")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m elastic.export_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="exported checkpoint folders")
    args = ap.parse_args(argv)
    bad = 0
    for folder in args.folders:
        problems = check(folder)
        for p in problems:
            print(f"{folder}: {p}")
        if not problems:
            kind = "FP8 (modelopt)" if (Path(folder) / "hf_quant_config.json").exists() else "unquantized"
            print(f"{folder}: ok ({kind})")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
