"""What a model costs to hold and to run.

Static figures come from `Arch` (the one source of truth for sizes): parameters, KV cache per token
(attention layers only), the fixed state of the recurrent layers per sequence (NemotronH's Mamba
state; key ``mamba_state_bytes``). Weight bytes are read from the
safetensors headers of the folder, so an FP8 export counts its 1-byte weights as stored.

Measured figures: prefill tokens/s (one forward of the context), decode tokens/s (greedy steps with
the cache after that prefill) and peak memory of the prefill, at each context length. On a GPU the
peak is `torch.cuda.max_memory_allocated` above what was allocated before; on a CPU it is the peak
of the tensors alive during the forward (weights, cache and activations), tracked by torch's
`MemTracker` in a separate untimed pass, since the CPU allocator keeps no such counter.
"""

from __future__ import annotations

import inspect
import json
import struct
import time
from pathlib import Path

import torch

from elastic.models.family import Sizes as Arch  # any family's sizes type


def weight_bytes(folder: Path) -> int:
    """Bytes of every tensor stored in the folder's ``*.safetensors`` files (from the headers only)."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]])
    return total


def static_cost(arch: Arch, folder: Path | None = None, bytes_per_value: int = 2) -> dict:
    """Sizes of one model; memory figures in `bytes_per_value` (2 = bf16) except the stored weights."""
    total = arch.num_params()
    out = {
        "params": total,
        "non_embedding_params": total - arch.embedding_params(),
        "kv_bytes_per_token": arch.kv_cache_bytes_per_token(bytes_per_value),
        "mamba_state_bytes": arch.state_bytes(bytes_per_value),
        "bf16_weight_bytes": total * bytes_per_value,
        "layers": arch.pattern,
    }
    if folder is not None:
        out["weight_bytes"] = weight_bytes(folder)
    return out


def memory_curve(arch: Arch, contexts: list[int], bytes_per_value: int = 2) -> list[int]:
    """Inference memory (weights + KV cache + Mamba state, one sequence) at each context length."""
    return [arch.memory_bytes(int(c), batch=1, bytes_per_value=bytes_per_value) for c in contexts]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(model, ids: torch.Tensor) -> int:
    """Peak bytes alive during one cached forward of `ids` (weights included)."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        model(input_ids=ids, use_cache=True)
        return torch.cuda.max_memory_allocated(device)
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model)
    with mt:
        model(input_ids=ids, use_cache=True)
    peak = mt.get_tracker_snapshot("peak")
    return int(sum(v.get("Total", 0) for v in peak.values()))


@torch.no_grad()
def measure(model, lengths: list[int], decode_tokens: int = 8, repeats: int = 1, vocab: int | None = None, seed: int = 0) -> list[dict]:
    """Prefill and decode tokens/s (best of `repeats`) and peak memory at each context length (random token ids)."""
    device = next(model.parameters()).device
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    vocab = vocab or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (1, int(n)), generator=gen).to(device)
        model(input_ids=ids[:, :8], use_cache=True)  # warm-up: first-call allocations are not the model's cost
        prefill = decode = float("inf")
        for _ in range(max(1, int(repeats))):  # the fastest run counts: other processes only ever slow one down
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            _sync(device)
            prefill = min(prefill, time.perf_counter() - t0)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                out = model(input_ids=tok, use_cache=True, **{cache_kw: cache})
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            decode = min(decode, time.perf_counter() - t0)
            del out, cache
        rows.append({"length": int(n), "prefill_tokens_per_s": n / prefill,
                     "decode_tokens_per_s": decode_tokens / decode, "peak_bytes": _peak_bytes(model, ids)})
    return rows
