"""FP8 post-training quantization with NVIDIA Model Optimizer, and reading its exports back.

Writing (the `quantize` stage): `keep_bf16` turns named globs into the modules that stay unquantized,
`quant_config` builds modelopt's per-tensor FP8 E4M3 config (weights and activations, max
calibration, optionally the KV cache), `quantize` calibrates, `export` writes the folder vLLM and
TensorRT-LLM read and then reads it back and repairs the defects modelopt is known to write.

Reading: `is_modelopt_fp8(path)` and `load_dequantized(path)`: plain transformers does not know
modelopt's FP8 format (it would drop the scales and compute wrong logits), so the reader multiplies
each FP8 weight by its scale into a plain Hugging Face model, and by default also rounds each
quantized layer's input to FP8 with its calibrated scale, which is what an FP8 engine computes.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elastic.models.family import EXPERT_PROJECTIONS, is_fused_experts
from elastic.parent import ModelError

FP8_MAX = 448.0  # the largest float8 e4m3fn value: scale = amax / FP8_MAX
SCALES = (".weight_scale", ".input_scale", ".k_scale", ".v_scale")  # what modelopt's FP8 export adds to a module
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # what vLLM's FP8 kernels take as activations


class QuantizeError(ValueError):
    """Bad input for the quantize stage, or an export that cannot be repaired (one line in `elastic.run`)."""


def _modelopt():
    warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt")
    import modelopt.torch.quantization as mtq

    return mtq


# ------------------------------------------------------------------------------------------------ names


def hub_namer(model) -> Callable[[str], str]:
    """In-memory module name -> the name on the hub and in exports (NemotronH: ``model.`` -> ``backbone.``),
    by transformers' own reverse of the renaming it applied on load."""
    from transformers.core_model_loading import revert_weight_conversion

    cache: dict[str, str] = {}

    def name(module: str) -> str:
        if module not in cache:
            (key,) = revert_weight_conversion(model, {f"{module}.weight": torch.empty(1)})
            cache[module] = key.removesuffix(".weight")
        return cache[module]

    return name


def quantizable(model) -> list[str]:
    """Modules modelopt gives FP8 weight quantizers: linears, convolutions and fused routed experts
    (embeddings never: vLLM does not quantize them; a MoE router is no linear module, never either)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d)) or is_fused_experts(m)]


def keep_fp32(model) -> list[str]:
    """Parameters the model's family computes in fp32 whatever the load dtype (transformers'
    ``_keep_in_fp32_modules_strict``; NemotronH: the MoE router's ``gate.weight``, its
    ``e_score_correction_bias`` being a buffer no cast touches): they stay fp32 in the FP8 export too, as in
    the family's own checkpoints."""
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return [n for n, _ in model.named_parameters() if any(k in n for k in keep)]


def round_to_export_dtype(model, dtype: torch.dtype, compute: torch.dtype | None = None) -> None:
    """Round every parameter to the export's `dtype` (those of `keep_fp32` stay fp32), held in `compute`
    (default: `dtype` itself; fp32 on a CPU, where bf16 matmuls are slow)."""
    fp32 = set(keep_fp32(model))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in fp32:
                p.data = p.data.to(torch.float32)
            else:
                p.data = p.data.to(dtype).to(compute or dtype)


def keep_bf16(model, globs: Iterable[str], to_hub: Callable[[str], str] | None = None) -> tuple[list[str], list[str]]:
    """(quantizable modules the globs keep unquantized, globs that match no module at all).

    A glob matches a module's in-memory name (``model.layers.3.mixer.in_proj``) or its hub name
    (``backbone.layers.3...``), and keeps that module and every module below it unquantized.
    """
    to_hub = to_hub or hub_namer(model)
    names = [n for n, _ in model.named_modules() if n]
    globs = list(dict.fromkeys(globs))
    hits = {g: [n for n in names if fnmatch.fnmatchcase(n, g) or fnmatch.fnmatchcase(to_hub(n), g)] for g in globs}
    matched = {n for ns in hits.values() for n in ns}
    kept = [n for n in quantizable(model) if any(n == m or n.startswith(m + ".") for m in matched)]
    return kept, [g for g in globs if not hits[g]]


def resolve_globs(presets: Mapping[str, Any], preset: str | None, extra: Iterable[str] = ()) -> list[str]:
    """The preset's globs plus `extra`; an unknown preset is an error naming the known ones."""
    globs: list[str] = []
    if preset is not None:
        if preset not in presets:
            raise QuantizeError(f"unknown quantize.preset {preset!r}; presets: {', '.join(sorted(presets))} "
                                "(or add one under quantize.presets)")
        globs += list(presets[preset] or [])
    globs += list(extra or [])
    bad = [g for g in globs if not isinstance(g, str) or not g]
    if bad:
        raise QuantizeError(f"quantize globs must be non-empty strings, got {bad}")
    return globs


# ------------------------------------------------------------------------------------------------ quantize


def quant_config(kept: Iterable[str], kv_cache: bool = False) -> dict:
    """modelopt's per-tensor FP8 E4M3 weights + activations with max calibration (the numeric format
    taken from `FP8_DEFAULT_CFG`), our own exclusions instead of its name list, optionally FP8 KV."""
    mtq = _modelopt()
    base = {e["quantizer_name"]: e for e in mtq.FP8_DEFAULT_CFG["quant_cfg"] if "parent_class" not in e}
    entries = [{"quantizer_name": "*", "enable": False},
               copy.deepcopy(base["*weight_quantizer"]), copy.deepcopy(base["*input_quantizer"])]
    if kv_cache:
        entries += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    entries.append({"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False})
    # last, so they win: every quantizer at or below a kept module is off
    entries += [{"quantizer_name": f"{n}.*", "enable": False} for n in kept]
    return {"quant_cfg": entries, "algorithm": "max"}


def quantize(model, config: dict, batches: list[torch.Tensor]) -> Any:
    """`mtq.quantize` in place, max calibration on `batches` (token ids). On CPU this is fake quant."""
    mtq = _modelopt()
    device = next(model.parameters()).device

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(ids.to(device), use_cache=False)

    return mtq.quantize(model, config, forward_loop)


def quantized_modules(model) -> list[str]:
    """Modules whose FP8 weight quantizer is on, after `quantize` (fused experts: every expert's, both projections)."""
    def on(m) -> bool:
        if getattr(m, "weight_quantizer", None) is not None:
            return m.weight_quantizer.is_enabled
        lists = [getattr(m, a, None) for a in ("gate_up_proj_weight_quantizers", "up_proj_weight_quantizers",
                                               "down_proj_weight_quantizers")]
        lists = [q for q in lists if q is not None]
        return bool(lists) and all(q.is_enabled for ql in lists for q in ql)

    return [n for n, m in model.named_modules() if on(m)]


# ------------------------------------------------------------------------------------------------ export


def export(model, folder: str | Path, dtype: torch.dtype, to_hub: Callable[[str], str]) -> list[str]:
    """Write `model` (quantized) to `folder` with modelopt's HF export, then read the files back and
    repair known defects (returned, one line each). The model is converted in place: do not run it after.
    """
    from modelopt.torch.export import export_hf_checkpoint

    folder = Path(folder)
    if model.config.architectures is None:  # a model built from a config has none; the export needs it
        model.config.architectures = [type(model).__name__]
    # modelopt casts only the quantized weights to `dtype`; the others it writes as they are: cast
    # them here (the quantizers' amax buffers stay fp32, so the scales written are those calibrated).
    # It then divides each weight by its scale in `dtype`: in bf16 that rounds twice and flips some
    # FP8 values against the fake-quant model; in fp32 the FP8 weights are exactly the fake-quant ones.
    round_to_export_dtype(model, dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch.tensor\(sourceTensor\).*")
        warnings.filterwarnings("ignore", message=r".*original dtype.*differs from target dtype.*")
        export_hf_checkpoint(model, dtype=torch.float32, export_dir=folder)
    return repair(folder, to_hub)


def _strip_sentinel(entry: str) -> str:
    """modelopt 0.47 + transformers 5.x: its reverse name mapping rewrites `model.` inside its own
    sentinel suffix, leaving ``"lm_head.\x00backbone.pt_name_sentinel"``; the module name is what
    precedes it. A trailing ``*`` (a whole subtree left unquantized) becomes ``name.*``: the bare
    ``name*`` would also match ``layers.20`` for ``layers.2``, in vLLM's substring and wildcard rules."""
    if "\x00" not in entry:
        return entry
    head, _, tail = entry.partition("\x00")
    name = head.rstrip(".")
    return f"{name}.*" if tail.endswith("*") else name


def repair(folder: str | Path, to_hub: Callable[[str], str] | None = None) -> list[str]:
    """Fix what modelopt is known to write wrong into an export, in place; raise `QuantizeError` on
    anything else that a serving engine would reject.

    - tensor names in transformers' in-memory form (modelopt < 0.46 with transformers 5) -> hub names;
    - exclusion entries with modelopt 0.47's sentinel garbage -> the module name before it;
    - exclusion entries in in-memory form -> hub names.
    """
    from elastic.export_check import check, module_names, names_a_module, tensor_headers
    from elastic.rundir import write_json

    folder = Path(folder)
    fixes: list[str] = []
    if to_hub is not None:
        keys = list(tensor_headers(folder))
        renamed = {k: _hub_key(k, to_hub) for k in keys}
        if any(k != v for k, v in renamed.items()):
            _rename_tensors(folder, renamed)
            fixes.append(f"renamed {sum(k != v for k, v in renamed.items())} tensors to the hub's names")
    modules = module_names(tensor_headers(folder))

    def fix_list(entries: list, where: str) -> list[str]:
        out = []
        for e in entries:
            new = _strip_sentinel(e) if isinstance(e, str) else e
            if isinstance(new, str) and not names_a_module(new, modules) and to_hub is not None:
                new = to_hub(new)
            if not names_a_module(new, modules):
                raise QuantizeError(f"modelopt's export lists {e!r} in {where}, and it is no module of the "
                                    f"written checkpoint; cannot repair it ({folder})")
            if new != e:
                fixes.append(f"{where}: {e!r} -> {new!r}")
            out.append(new)
        return list(dict.fromkeys(out))

    config_file, hq_file = folder / "config.json", folder / "hf_quant_config.json"
    config = json.loads(config_file.read_text())
    if config.get("tie_word_embeddings"):
        modules = set(modules) | {"lm_head"}  # a tied head is a module with no tensor of its own in the files
    q = config.get("quantization_config")
    if not isinstance(q, dict) or not hq_file.exists():
        raise QuantizeError(f"modelopt's export in {folder} has no quantization_config in config.json or no "
                            "hf_quant_config.json; vLLM could not read it")
    q["ignore"] = fix_list(q.get("ignore", []), "config.json quantization_config.ignore")
    hq = json.loads(hq_file.read_text())
    hq["quantization"]["exclude_modules"] = fix_list(hq["quantization"].get("exclude_modules", []),
                                                     "hf_quant_config.json exclude_modules")
    write_json(config_file, config)
    write_json(hq_file, hq)
    problems = check(folder)
    if problems:
        raise QuantizeError(f"the FP8 export in {folder} is not loadable: " + "; ".join(problems))
    return fixes


def _hub_key(key: str, to_hub: Callable[[str], str]) -> str:
    module, _, leaf = key.rpartition(".")
    return f"{to_hub(module)}.{leaf}" if module else key


def _rename_tensors(folder: Path, renamed: dict[str, str]) -> None:
    from safetensors.torch import load_file, save_file

    from elastic.export_check import WEIGHTS_INDEX, weight_files
    from elastic.rundir import write_json

    for name in weight_files(folder):
        tensors = load_file(str(folder / name))
        save_file({renamed.get(k, k): v for k, v in tensors.items()}, str(folder / name), metadata={"format": "pt"})
    index = folder / WEIGHTS_INDEX
    if index.exists():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {renamed.get(k, k): v for k, v in doc["weight_map"].items()}
        write_json(index, doc)


# ------------------------------------------------------------------------------------------------ reading


def quantization_config(path: str | Path) -> dict | None:
    """config.json's `quantization_config` (any method), or hf_quant_config.json's, or None."""
    p = Path(path)
    try:
        q = json.loads((p / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        q = None
    if q is None and (p / "hf_quant_config.json").is_file():
        hq = json.loads((p / "hf_quant_config.json").read_text())
        q = {"quant_method": hq.get("producer", {}).get("name", "modelopt"), **hq.get("quantization", {})}
    return q


def is_modelopt_fp8(path: str | Path) -> bool:
    """True for a folder in NVIDIA Model Optimizer's FP8 format (what `stage=quantize` writes)."""
    q = quantization_config(path) or {}
    return str(q.get("quant_method", "")).lower().startswith("modelopt") and str(q.get("quant_algo", "")).upper() == "FP8"


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round `x` to FP8 E4M3 with a per-tensor `scale` and back (modelopt's fake quant on CPU)."""
    s = scale.to(torch.float32)
    y = (x.to(torch.float32) * (1.0 / s)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (y.to(torch.float32) * s).to(x.dtype)


def load_dequantized(path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                     *, activations: bool = True):
    """A plain transformers model from a modelopt FP8 export, for evaluation without FP8 hardware.

    Every FP8 weight becomes ``weight * weight_scale`` in `dtype`. With `activations` (default) each
    quantized layer also rounds its input to FP8 with the calibrated ``input_scale``, and with an FP8
    KV cache the key and value projections round their outputs with ``k_scale`` / ``v_scale``:
    the numbers an FP8 engine computes. ``activations=False`` gives the weight-only model.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from elastic.export_check import weight_files
    from elastic.parent import check_checkpoint, torch_dtype

    p = check_checkpoint(path)
    if not is_modelopt_fp8(p):
        raise ModelError(f"{p} is not a modelopt FP8 export (no quantization_config with quant_method modelopt, "
                         "quant_algo FP8); load it with AutoModelForCausalLM.from_pretrained")
    dt = torch_dtype(dtype)
    state: dict[str, torch.Tensor] = {}
    for name in weight_files(p):
        state.update(load_file(str(p / name)))
    scales = {k: state.pop(k) for k in [k for k in state if k.endswith(SCALES)]}
    if not any(t.dtype == torch.float8_e4m3fn for t in state.values()):
        raise ModelError(f"{p} says it is modelopt FP8 (config.json quantization_config) but holds no float8 weights")
    for k in list(state):
        if state[k].dtype == torch.float8_e4m3fn:
            module = k.removesuffix(".weight")
            if f"{module}.weight_scale" not in scales:
                raise ModelError(f"{p}: {k} is FP8 but has no weight_scale")
            state[k] = (state[k].to(torch.float32) * scales[f"{module}.weight_scale"].to(torch.float32)).to(dt)
        elif state[k].is_floating_point():
            state[k] = state[k].to(dt)
    config = AutoConfig.from_pretrained(p)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else transformers looks for a quantizer it does not have
    # from_pretrained with a state dict (not a folder) applies transformers' hub -> in-memory renaming
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=state, dtype=dt)
    model = model.to(device).eval()
    if activations:
        to_hub = hub_namer(model)
        for name, module in model.named_modules():
            hub = to_hub(name) if name else name
            if f"{hub}.input_scale" in scales:
                module.register_forward_pre_hook(_round_input(scales[f"{hub}.input_scale"].to(device)))
            if is_fused_experts(module) and f"{hub}.0.{EXPERT_PROJECTIONS[-1]}.input_scale" in scales:
                _round_experts(module, hub, scales, device, p)
            for kv in ("k_scale", "v_scale"):
                if f"{hub}.{kv}" in scales:
                    module.register_forward_hook(_round_output(scales[f"{hub}.{kv}"].to(device)))
    return model


def _round_experts(module, hub: str, scales: Mapping[str, torch.Tensor], device, path) -> None:
    """Round the inputs of fused routed experts as an FP8 engine does: the layer's input (what every
    expert's ``up_proj`` reads) and the activation's output (what every ``down_proj`` reads), each with
    the one input scale modelopt calibrates per projection for all the layer's experts."""
    if getattr(module, "has_gate", False) or getattr(module, "gate_up_proj", None) is not None:
        raise ModelError(f"{path}: FP8 activations of gated fused experts ({hub}) are not emulated; "
                         "load it with activations=False")
    for proj in EXPERT_PROJECTIONS:
        found = {scales[k].item() for i in range(module.num_experts) if (k := f"{hub}.{i}.{proj}.input_scale") in scales}
        if len(found) != 1:
            raise ModelError(f"{path}: the experts of {hub} have {len(found)} different {proj} input scales; "
                             "modelopt writes one per layer and projection")
    first, second = EXPERT_PROJECTIONS
    module.register_forward_pre_hook(_round_input(scales[f"{hub}.0.{first}.input_scale"].to(device)))
    module.act_fn.register_forward_hook(_round_output(scales[f"{hub}.0.{second}.input_scale"].to(device)))


def _round_input(scale: torch.Tensor):
    def hook(module, args):
        return (fake_fp8(args[0], scale), *args[1:])

    return hook


def _round_output(scale: torch.Tensor):
    def hook(module, args, output):
        return fake_fp8(output, scale)

    return hook
