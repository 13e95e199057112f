"""What a model costs to hold and to run.

Static figures come from `Arch` (the one source of truth for sizes): parameters, KV cache per token
(attention layers only), the fixed state of the recurrent layers per sequence (NemotronH's Mamba
state; key ``mamba_state_bytes``). Weight bytes are read from the
safetensors headers of the folder, so an FP8 export counts its 1-byte weights as stored.

Measured figures, each its own function so that one failing loses only itself: prefill tokens/s (one
forward of the context) and decode tokens/s (greedy steps with the cache after that prefill) in
`throughput`, and the peak memory of one cached prefill in `peak_memory`, at each context length.

Peak memory. On a GPU it is `torch.cuda.max_memory_allocated` after resetting the peak (weights
included). A CPU allocator keeps no such counter, so `LiveBytes` counts it: a `TorchDispatchMode`
sees every aten op of the forward, below autograd and without any module hook, and adds the storage
of each tensor an op returns the first time it sees that storage (views and in-place results share
their base's storage, so nothing is counted twice); a weakref on the storage subtracts its bytes the
moment it is freed. The count starts from the parameters, buffers and inputs, so the peak is that of
all tensors alive during the forward, the figure ``max_memory_allocated`` gives on a GPU (without the
allocator's rounding). Module hooks are what broke the previous probe (torch's ``MemTracker``): its
pre-hook registers a grad hook on every input that requires grad, and transformers 5.25 passes the
conv weight (``conv1d.weight.squeeze(1)``: under ``no_grad`` a view that requires grad yet has no
grad function) into a module of the ``kernels`` package, where that asserts. A dispatch mode sees
tensors, never modules, so no model layout can trip it.
"""

from __future__ import annotations

import inspect
import json
import struct
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

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
    """Sizes of one model; memory figures in `bytes_per_value` (2 = bf16) except the stored weights.

    ``active_params``: the parameters one token touches (`Sizes.active_params`: embeddings and head, every
    non-MoE layer, and per MoE layer the router, the shared expert and top-k routed experts); equal to
    ``params`` for a dense model. Memory figures hold every expert: they are all resident."""
    total = arch.num_params()
    out = {
        "params": total,
        "active_params": arch.active_params(),
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


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding a tensor's data (a wrapper subclass such as DTensor: those of its inner tensors)."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        return [st for a in attrs for st in _storages(getattr(t, a))]
    if t.device.type == "meta":  # no memory behind it
        return []
    return [t.untyped_storage()]


class LiveBytes(TorchDispatchMode):
    """Bytes of the distinct storages alive while the mode is on, and their high-water mark (`peak`).

    ``LiveBytes(*tensors)`` starts from the storages of `tensors` (weights, inputs); then every op's
    output storages count from the first op that returns them until they are freed.
    """

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (weakref, bytes counted)
        self.now = self.peak = 0
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        for st in _storages(t):
            key, n = id(st), st.nbytes()
            if key in self._live:
                ref, counted = self._live[key]
                if ref() is st:  # seen before; an in-place resize_ may have changed its size
                    if n != counted:
                        self._live[key] = (ref, n)
                        self.now += n - counted
                    continue
            # torch keeps one Python storage object per live storage, so the weakref dies with the memory
            self._live[key] = (weakref.ref(st, lambda _r, key=key: self._free(key)), n)
            self.now += n
        self.peak = max(self.peak, self.now)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.now -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def __exit__(self, *exc):
        self._live.clear()  # callbacks still pending find nothing to subtract
        return super().__exit__(*exc)


def peak_bytes(model, ids: torch.Tensor) -> int:
    """Peak bytes alive during one cached forward of `ids` (weights included); see the module docstring."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        model(input_ids=ids, use_cache=True)
        return torch.cuda.max_memory_allocated(device)
    with LiveBytes(*model.parameters(), *model.buffers(), ids) as live:
        model(input_ids=ids, use_cache=True)
    return live.peak


def _inputs(model, lengths: list[int], vocab: int | None, seed: int):
    """(length, random token ids on the model's device) per context length."""
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    for n in lengths:
        yield int(n), torch.randint(0, vocab, (1, int(n)), generator=gen).to(device)


@torch.no_grad()
def throughput(model, lengths: list[int], decode_tokens: int = 8, repeats: int = 1, vocab: int | None = None,
               seed: int = 0) -> list[dict]:
    """Prefill and decode tokens/s (best of `repeats`) at each context length (random token ids)."""
    device = next(model.parameters()).device
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = []
    for n, ids in _inputs(model, lengths, vocab, seed):
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
        rows.append({"length": n, "prefill_tokens_per_s": n / prefill, "decode_tokens_per_s": decode_tokens / decode})
    return rows


@torch.no_grad()
def peak_memory(model, lengths: list[int], vocab: int | None = None, seed: int = 0) -> list[dict]:
    """Peak bytes of one cached prefill at each context length (random token ids; the same ids as `throughput`)."""
    rows = []
    for n, ids in _inputs(model, lengths, vocab, seed):
        model(input_ids=ids[:, :8], use_cache=True)  # warm-up, as for the throughput: lazy workspaces are not the model's
        rows.append({"length": n, "peak_bytes": int(peak_bytes(model, ids))})
    return rows
