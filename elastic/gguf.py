"""GGUF export for llama.cpp: llama.cpp's own converter and quantizer, and a check that runs the result.

What llama.cpp ships is used as it is, never copied: its converter ``convert_hf_to_gguf.py`` (from the
``llama-cpp-python`` sdist, which vendors llama.cpp; cached by ``scripts/install_gguf.sh``) runs as a
child process, and its quantizer and runtime come from the built ``llama_cpp`` package. Two things
stand between a checkpoint of this project and a GGUF that llama.cpp runs, and both are handled here
without editing llama.cpp's files:

- The converter names a BPE tokenizer's pre-tokenizer by hashing the token ids of one test string, so
  it knows only tokenizers it has seen (a tokenizer trained here is new to it by construction).
  :func:`pretokenizer_type` inspects the tokenizer instead: when its pre-tokenization is exactly
  GPT-2's byte-level split it maps to llama.cpp's ``gpt-2`` type, which the child process gives the
  converter only when the converter's own lookup fails. After conversion :func:`check_tokenizer`
  proves the mapping by tokenizing test texts in transformers and in llama.cpp.
- A family whose transformers config differs from what the converter expects says so in its export
  facts (`elastic.models.<family>.export_facts`): :func:`hub_style_config` hands the config to the
  family's ``llama_cpp_config`` (NemotronH: the hub's ``hybrid_override_pattern`` and no MoE keys for
  a dense model, see ``elastic/models/nemotron_h/export.py``), and when the family sets
  ``GGUF_CONFIG_AS_WRITTEN`` the child process hands the converter that config.json as written
  instead of its ``AutoConfig`` view, as the converter's own fallback for unreadable configs does.
  Families without such facts (e.g. Llama, which the converter knows natively) go through unchanged.

Everything that runs llama.cpp's native code (quantizing, loading, tokenizing, generating) runs in a child
Python process (:func:`in_child`), so a crash in llama.cpp (a signal: SIGILL, SIGSEGV, SIGABRT, ...) is one
`NativeCrash` line naming the signal instead of a dead process without a traceback (or a dead pytest worker).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from elastic.models import family_attr

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the llama-cpp-python release scripts/install_gguf.sh builds (vendors llama.cpp)

# Types the converter writes losslessly from the checkpoint; every other type is made from that
# intermediate by llama.cpp's quantizer (`llama_model_quantize`), as `llama-quantize` would.
_CONVERTER_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# quant name -> llama.cpp's file type constant (llama_cpp.LLAMA_FTYPE_*)
QUANTS = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1", "q4_k_m": "MOSTLY_Q4_K_M", "q4_k_s": "MOSTLY_Q4_K_S", "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1", "q3_k_l": "MOSTLY_Q3_K_L", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_s": "MOSTLY_Q3_K_S",
    "q2_k": "MOSTLY_Q2_K",
}

# Texts for the tokenizer checks: whitespace runs, tabs and newlines, contractions, digit runs,
# punctuation runs, accents, Cyrillic, CJK, emoji and zero-width joiners -- where pre-tokenizers differ.
PRETOKENIZER_TEXTS = (
    "To be, or not to be: that is the question.\n\nWhether 'tis nobler in the mind to suffer",
    "  two spaces,\tone tab,\t\ttwo tabs;\n \n\n   \n trailing   ",
    "I'm sure you'll say we've done it; they're here, he'd go, she's gone. DON'T SHOUT'S",
    "1 12 123 1234 12345 123456 3.14159 1,000,000 2026-11-28 0x1F 7th",
    "!!!??? ... --- === ``` \"\"\" ''' (a) [b] {c} <d> @e #f $g %h ^i &j *k",
    "naïve café résumé Ærø straße; Привет, мир; 你好，世界; こんにちは; 안녕하세요",
    "emoji 🦙🦙 👩‍💻 ✅ 😶‍🌫️ and a\u200bzero-width space",
)


class GGUFError(ValueError):
    """Bad input for the GGUF export (reported as one `elastic: error:` line by `elastic.run`)."""


class NativeCrash(GGUFError):
    """llama.cpp's process died (by a signal, or exiting without a result): one `elastic: error:` line, exit 2."""


# ------------------------------------------------------------------------------------------------ config


def hub_style_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config dict as llama.cpp's converter expects it: the family's ``llama_cpp_config`` when its
    export facts have one (NemotronH: written the way NVIDIA's hub checkpoints are), else unchanged.
    transformers builds the same model from either form (tests/test_gguf.py compares logits)."""
    rewrite = getattr(family_attr(config, "export_facts"), "llama_cpp_config", None)
    if rewrite is None:
        return dict(config)
    try:
        return rewrite(config)
    except ValueError as e:  # layer kinds llama.cpp has no name for
        raise GGUFError(str(e)) from None


# ------------------------------------------------------------------------------------------------ tokenizer


def pretokenizer_type(tokenizer) -> str:
    """llama.cpp's pre-tokenizer type for `tokenizer` (a transformers fast tokenizer), found by behaviour.

    Only GPT-2's byte-level BPE is recognised here: BPE model, no normalizer, and a pre-tokenizer that
    splits every test text exactly as ``ByteLevel(add_prefix_space=False)`` with GPT-2's regex does.
    Raises `GGUFError` saying which part differs otherwise.
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; the GGUF export reads tokenizer.json")
    spec = json.loads(backend.to_str())
    kind = (spec.get("model") or {}).get("type")
    if kind != "BPE":
        raise GGUFError(f"the tokenizer is a {kind} model, not byte-level BPE; llama.cpp's converter does not know it "
                        "and no GPT-2-style mapping applies")
    if spec.get("normalizer"):
        raise GGUFError(f"the tokenizer normalizes text first ({spec['normalizer'].get('type')}), which llama.cpp's gpt-2 "
                        "pre-tokenizer does not; the converter does not know this tokenizer")
    if backend.pre_tokenizer is None:
        raise GGUFError("the tokenizer has no pre-tokenizer; llama.cpp's converter does not know it")
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in PRETOKENIZER_TEXTS:
        ours = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        ref = [p for p, _ in gpt2.pre_tokenize_str(text)]
        if ours != ref:
            i = next(i for i in range(max(len(ours), len(ref))) if ours[i:i + 1] != ref[i:i + 1])
            piece = lambda parts: repr(parts[i][:20]) if i < len(parts) else "nothing"  # noqa: E731
            raise GGUFError(f"the tokenizer's pre-tokenizer ({spec['pre_tokenizer'].get('type')}) is not GPT-2's byte-level "
                            f"split and llama.cpp's converter does not know it: in {text[:24]!r} piece {i} is {piece(ours)}, "
                            f"GPT-2's split gives {piece(ref)}")
    return "gpt-2"


def check_tokenizer(gguf_path: str | Path, tokenizer) -> None:
    """Raise `GGUFError` unless llama.cpp tokenizes and detokenizes every test text as `tokenizer` does."""
    refs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PRETOKENIZER_TEXTS]
    got, detok = in_child(_llama_tokenize, str(gguf_path), list(PRETOKENIZER_TEXTS), refs,
                          what=f"loading the tokenizer of {Path(gguf_path).name}")
    for text, ref, ids, back in zip(PRETOKENIZER_TEXTS, refs, got, detok):
        if ids != ref:
            raise GGUFError(f"llama.cpp tokenizes {text[:30]!r} differently from transformers "
                            f"({len(ids)} vs {len(ref)} tokens); the GGUF's tokenizer ({gguf_pre(gguf_path)}) does not match")
        if back != tokenizer.decode(ref).encode():
            raise GGUFError(f"llama.cpp detokenizes the ids of {text[:30]!r} to other text than transformers does")


def _llama_tokenize(path: str, texts: list[str], ids: list[list[int]]) -> tuple[list[list[int]], list[bytes]]:
    """Child process (`in_child`): llama.cpp's token ids of each text, and its text of each id list."""
    import llama_cpp

    with quiet_llama():
        llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    try:
        return ([llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts],
                [llm.detokenize(i) for i in ids])
    finally:
        llm.close()


def gguf_pre(path: str | Path) -> str | None:
    """The ``tokenizer.ggml.pre`` value of a GGUF file."""
    return gguf_metadata(path).get("tokenizer.ggml.pre")


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Scalar metadata and tensor-type counts of a GGUF file (read with the `gguf` library)."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or len(field.types) != 1:  # arrays (token lists, per-layer sizes) are left out
            continue
        value = field.contents()
        if isinstance(value, (str, int, float, bool)):
            meta[name] = value
    meta["tensor_types"] = dict(Counter(t.tensor_type.name for t in reader.tensors))
    meta["tensors"] = len(reader.tensors)
    return meta


# ------------------------------------------------------------------------------------------------ llama.cpp


def llama_cpp_dir() -> Path:
    """The llama.cpp source tree with the converter: ``$ELASTIC_LLAMA_CPP``, or the unpacked sdist that
    ``scripts/install_gguf.sh`` caches in ``$ELASTIC_CACHE/gguf`` (default ``~/.cache/elastic/gguf``)."""
    if os.environ.get("ELASTIC_LLAMA_CPP"):
        root = Path(os.environ["ELASTIC_LLAMA_CPP"]).expanduser()
    else:
        cache = Path(os.environ.get("ELASTIC_CACHE", "~/.cache/elastic")).expanduser() / "gguf"
        root = cache / f"llama_cpp_python-{llama_cpp_version()}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise GGUFError(f"llama.cpp's converter is not at {root / 'convert_hf_to_gguf.py'}: run `bash scripts/install.sh --gguf` "
                        "(or point ELASTIC_LLAMA_CPP at a llama.cpp checkout)")
    return root


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version, read from its metadata: this process never loads llama.cpp's
    native library (only `in_child` processes do)."""
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise GGUFError("export.format=gguf needs llama-cpp-python and llama.cpp's converter: run "
                        "`bash scripts/install.sh --gguf`")
    return md.version("llama_cpp_python")


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"llama_cpp_source": str(llama_cpp_dir())}
    for pkg in ("llama_cpp_python", "gguf", "transformers", "torch", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class quiet_llama:
    """Collect llama.cpp's log instead of printing it (llama-cpp-python prints its errors to stderr), so
    that a file llama.cpp cannot load raises `GGUFError` with llama.cpp's own last error lines."""

    def __enter__(self):
        import llama_cpp

        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def _log(level, text, user_data):
            self.lines.append(text.decode(errors="replace"))

        self._cb = _log  # keep a reference: C holds only the pointer
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, exc_type, exc, tb):
        import llama_cpp._logger

        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own
        if exc_type is not None and issubclass(exc_type, ValueError) and not issubclass(exc_type, GGUFError):
            errors = [ln.strip() for ln in "".join(self.lines).splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
            raise GGUFError(f"llama.cpp cannot load the GGUF: {'; '.join(errors[-3:]) or exc}") from None
        return False


# What a signal that kills llama.cpp's process most likely means, and what to do (the tail of the error line).
_CRASH_HINTS = {
    "SIGILL": "this llama.cpp executes an instruction the process cannot run (a build with AMX, or one made for "
              "another CPU); rebuild it with `bash scripts/install_gguf.sh`, which builds it for this CPU with AMX off",
    "SIGKILL": "killed from outside, most often by the kernel's out-of-memory killer; free memory or use fewer export.quant types",
}
_CRASH_HINT = "a crash inside llama.cpp's native code; rebuild it with `bash scripts/install_gguf.sh`, and report it if it persists"


def in_child(fn, *args, what: str, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh Python process; its result returned, its exception raised here.

    llama.cpp is native code: when it crashes (SIGILL from instructions the CPU or the process may not
    use, SIGSEGV, SIGABRT from a failed GGML_ASSERT) the process running it dies at once, with no Python
    traceback -- a user's stage, or a pytest-xdist worker ("node down"). Here only the child dies, and
    `NativeCrash` says which signal, while doing `what`, and what to do. A fresh interpreter
    (``python -m elastic.gguf child``), not multiprocessing: fork would copy a process with torch's
    threads running, and spawn would re-import the caller's ``__main__`` (elastic.run and Hydra, or pytest).
    The child also keeps PyTorch out of the process that runs ggml's kernels. `fn` must be importable by
    its name (a module-level function); arguments and result travel pickled.
    """
    # the parent's import path (minus the interpreter's own), so the child imports the same elastic and modules
    paths = [p for p in sys.path if p and not p.startswith((sys.base_prefix, sys.prefix))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with tempfile.TemporaryDirectory(prefix="elastic-llama_cpp-") as tmp:
        result = Path(tmp) / "result.pickle"
        proc = subprocess.run([sys.executable, "-m", "elastic.gguf", "child", str(result)], input=pickle.dumps((fn, args, kwargs)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        if result.is_file():  # written (atomically) once fn returned or raised, whatever happened after
            ok, value = pickle.loads(result.read_bytes())
            if ok:
                return value
            raise value
    lines = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-proc.returncode}"
        desc = (signal.strsignal(-proc.returncode) or name).lower()
        said = f" (its last words: {lines[-1][:200]!r})" if lines else ""  # e.g. the GGML_ASSERT behind a SIGABRT
        raise NativeCrash(f"llama.cpp died with {name} ({desc}) while {what}{said}: {_CRASH_HINTS.get(name, _CRASH_HINT)}")
    raise NativeCrash(f"llama.cpp's process exited with code {proc.returncode} and no result while {what}: "
                        f"{lines[-1][:200] if lines else 'no output'}")


def _child_main(result: str) -> None:
    """The child of `in_child`: run the pickled call from stdin, write (ok, value or exception) to `result`."""
    fn, args, kwargs = pickle.load(sys.stdin.buffer)
    try:
        out = (True, fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - every Python error goes back to the parent, raised there
        if not isinstance(e, GGUFError):  # a bug, not bad input: keep where it happened
            e.add_note("in llama.cpp's child process:\n" + "".join(traceback.format_exception(e)).rstrip())
        out = (False, e)
    try:
        data = pickle.dumps(out)
    except Exception:  # noqa: BLE001 - an exception or result that does not pickle
        data = pickle.dumps((False, GGUFError(f"{type(out[1]).__name__}: {out[1]}")))
    tmp = f"{result}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, result)


def stage_source(checkpoint: str | Path, dest: Path) -> Path:
    """`dest` as a view of `checkpoint` for the converter: the files linked, config.json in the hub's style."""
    checkpoint = Path(checkpoint).resolve()
    dest.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.is_file() and f.name != "config.json":
            (dest / f.name).symlink_to(f)
    config = json.loads((checkpoint / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(hub_style_config(config), indent=2) + "\n")
    return dest


def convert(checkpoint: str | Path, out: Path, outtype: str, *, pre: str | None, workdir: Path, name: str | None = None) -> None:
    """Run llama.cpp's converter on `checkpoint` -> `out` (type `outtype`); `pre` is the pre-tokenizer type
    the converter falls back to when its own table does not know the tokenizer."""
    src = stage_source(checkpoint, workdir / "source")
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    as_written = bool(getattr(family_attr(config, "export_facts"), "GGUF_CONFIG_AS_WRITTEN", False))
    cmd = [sys.executable, "-m", "elastic.gguf", "convert", str(llama_cpp_dir()), pre or "",
           "as-written" if as_written else "autoconfig", str(src), "--outfile", str(out), "--outtype", outtype, "--model-name", name or Path(checkpoint).name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        raise GGUFError(f"llama.cpp's converter cannot convert {checkpoint}: {_converter_reason(proc.stderr + proc.stdout)}")


def _converter_reason(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):  # the exception line, or the converter's own ERROR line
        if re.match(r"^(\w+\.)*\w*(Error|Exception|NotImplementedError)\b", ln) or ln.startswith("ERROR:"):
            return ln.removeprefix("ERROR:hf-to-gguf:").removeprefix("ERROR:")
    return lines[-1] if lines else "no output"


def _converter_main(argv: Sequence[str]) -> None:
    """Child process: run llama.cpp's converter as it is, with two of its methods wrapped (its files untouched).

    - `get_vocab_base_pre` raises NotImplementedError for a BPE tokenizer missing from its hash table;
      when the parent verified the tokenizer's pre-tokenization (`pretokenizer_type`), that type is
      returned instead. Known tokenizers still get the converter's own answer.
    - `load_hparams` returns config.json as written (the hub-style one `stage_source` made) instead of
      transformers' AutoConfig view of it when `mode` is ``as-written`` (the family's export facts ask
      for it: AutoConfig would add back what `hub_style_config` removed).
    """
    llama_dir, pre, mode, *args = argv
    sys.path.insert(0, llama_dir)
    sys.argv = [str(Path(llama_dir) / "convert_hf_to_gguf.py"), *args]
    import convert_hf_to_gguf  # noqa: F401  (puts llama.cpp's gguf-py on sys.path first)
    from conversion import base

    lookup = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return lookup(self, tokenizer)
        except NotImplementedError as e:
            if not pre:
                raise NotImplementedError(f"tokenizer unknown to llama.cpp's converter ({e})") from None
            print(f"elastic: pre-tokenizer not in llama.cpp's table; using the verified {pre!r}", file=sys.stderr)
            return pre

    load_hparams = base.ModelBase.load_hparams

    def load_hparams_as_written(dir_model: Path, is_mistral_format: bool):
        # The converter reads configs through transformers' AutoConfig, which may refill what
        # hub_style_config removed (NemotronH: the MoE defaults, and llama.cpp would take the model for
        # its MoE variant); its own fallback reads config.json as written, which is what is needed here.
        return json.loads((Path(dir_model) / "config.json").read_text())

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    if mode == "as-written":
        base.ModelBase.load_hparams = staticmethod(load_hparams_as_written)
    convert_hf_to_gguf.main()


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (the function behind `llama-quantize`): `src` GGUF -> `dst` of type `quant`."""
    in_child(_quantize, str(src), str(dst), quant, threads, what=f"quantizing {Path(src).name} to {quant}")
    if not Path(dst).is_file():
        raise GGUFError(f"llama.cpp's quantizer wrote no file for {quant}")


def _quantize(src: str, dst: str, quant: str, threads: int | None) -> None:
    """Child process (`in_child`): `llama_model_quantize`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANTS[quant]}")
    params.nthread = threads or 0
    with quiet_llama() as log:
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise GGUFError(f"llama.cpp's quantizer failed for {quant}: {''.join(log.lines[-3:]).strip() or f'code {rc}'}")


def export_gguf(checkpoint: str | Path, name: str, quants: Sequence[str], *, workdir: Path, threads: int | None = None) -> dict[str, Path]:
    """Convert `checkpoint` once (lossless) and quantize it to every type in `quants`, inside `workdir`.

    Returns {quant: path in workdir}; the lossless file's tokenizer has been checked in llama.cpp. The
    caller moves the files into place, so a failure leaves nothing but `workdir` to remove.
    """
    from transformers import AutoTokenizer

    unknown = [q for q in quants if q not in QUANTS]
    if unknown or not quants:
        raise GGUFError(f"unknown GGUF type(s) {unknown or quants}; choose from: {', '.join(QUANTS)}")
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    hub_style_config(config)  # refuses layer kinds llama.cpp has no name for, before any work
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    try:
        pre = pretokenizer_type(tokenizer)
        pre_error = None
    except GGUFError as e:  # the converter may still know it by hash; if not, this is the reason given
        pre, pre_error = None, e
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    base_type = _CONVERTER_TYPES.get(dtype, "f32")
    base = workdir / f"{name}-{base_type}.gguf"
    try:
        convert(checkpoint, base, base_type, pre=pre, workdir=workdir, name=name)
    except GGUFError as e:
        if pre_error is not None and "tokenizer unknown" in str(e):
            raise pre_error from None
        raise
    check_tokenizer(base, tokenizer)
    files = {}
    for q in quants:
        dst = workdir / f"{name}-{q}.gguf"
        if q == base_type:
            os.link(base, dst)
        else:
            quantize(base, dst, q, threads)
        files[q] = dst
    return files


# ------------------------------------------------------------------------------------------------ check


def _greedy(step, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding with `step(ids) -> next-token logits` (the prompt first, then one token at a time)."""
    out: list[int] = []
    logits = step(prompt)
    while len(out) < max_new_tokens:
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in eos:
            break
        logits = step([nxt])
    return out


def run_hf(model, prompts: list[list[int]], rows, max_new_tokens: int, eos: set[int]) -> dict[str, Any]:
    """Greedy tokens, tokens/s and held-out NLL of a transformers model (the reference)."""
    import torch

    from elastic.inputs import heldout_loss

    generated, seconds = [], 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=sorted(eos) or None, pad_token_id=model.config.pad_token_id)
        seconds += time.perf_counter() - t0
        generated.append(ids[0, len(prompt):].tolist())
    nll = heldout_loss(model, [rows[i:i + 1] for i in range(len(rows))])
    return {"tokens": generated, "tokens_per_s": sum(map(len, generated)) / max(seconds, 1e-9), "nll": nll}


def run_llama(path: Path, prompts: list[list[int]], rows, max_new_tokens: int, eos: set[int], threads: int) -> dict[str, Any]:
    """The same measurements as `run_hf`, with llama.cpp (llama-cpp-python) running the GGUF file in a child
    process (`in_child`); `rows` is an [N, T] tensor or list of id lists."""
    rows = rows.tolist() if hasattr(rows, "tolist") else [list(r) for r in rows]  # plain ids: the child needs no torch
    return in_child(_run_llama, str(path), [list(p) for p in prompts], rows, max_new_tokens, sorted(eos), threads,
                    what=f"loading and running {Path(path).name}")


def _run_llama(path: str, prompts: list[list[int]], rows: list[list[int]], max_new_tokens: int, eos: list[int],
               threads: int) -> dict[str, Any]:
    """Child process (`in_child`): greedy tokens and tokens/s on `prompts`, held-out NLL of `rows`."""
    import llama_cpp
    import numpy as np

    n_ctx = max(max(map(len, rows)), max(map(len, prompts)) + max_new_tokens)
    with quiet_llama():
        llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False)
    try:
        def step(ids: list[int]):
            llm.eval(ids)
            return llm.scores[llm.n_tokens - 1]

        generated, seconds = [], 0.0
        for prompt in prompts:
            llm.reset()  # a fresh sequence: llama.cpp clears the KV cache and the Mamba state
            t0 = time.perf_counter()
            generated.append(_greedy(step, prompt, max_new_tokens, set(eos)))
            seconds += time.perf_counter() - t0
        total, count = 0.0, 0
        for row in rows:
            llm.reset()
            llm.eval(row)
            logits = np.asarray(llm.scores[: len(row) - 1], dtype=np.float64)
            peak = logits.max(-1, keepdims=True)
            logz = (peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True)))[:, 0]
            total += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
            count += len(row) - 1
    finally:
        llm.close()
    return {"tokens": generated, "tokens_per_s": sum(map(len, generated)) / max(seconds, 1e-9), "nll": total / count}


def check(checkpoint: str | Path, files: dict[str, Path], prompts: Sequence[str], rows, *, max_new_tokens: int,
          threads: int | None = None, hf_dtype: str | None = None) -> dict[str, Any]:
    """Run the HF checkpoint and every GGUF in `files` on the same prompts and held-out `rows` ([N, T] ids).

    Per model: greedy tokens (and whether they equal the HF model's), held-out NLL and perplexity, size
    on disk and CPU tokens/s. The HF model runs in `hf_dtype` (None: the checkpoint's own dtype).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(checkpoint)
    threads = int(threads or torch.get_num_threads())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    if not all(prompt_ids):
        raise GGUFError("an export.prompts entry tokenizes to nothing")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=hf_dtype or "auto").eval()
    eos_ids = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else []
    eos = set([eos_ids] if isinstance(eos_ids, int) else eos_ids)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hf = run_hf(model, prompt_ids, rows, max_new_tokens, eos)
    finally:
        torch.set_num_threads(torch_threads)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf |= {"format": f"transformers ({dtype})", "size_bytes": sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))}
    report: dict[str, Any] = {
        "source": str(checkpoint.resolve()), "prompts": list(prompts), "max_new_tokens": max_new_tokens, "threads": threads,
        "heldout": {"sequences": int(rows.shape[0]), "seq_len": int(rows.shape[1]), "tokens": int(rows.shape[0] * (rows.shape[1] - 1))},
        "models": {"hf": hf | {"ppl": math.exp(hf["nll"])}},
    }
    for quant, path in files.items():
        r = run_llama(path, prompt_ids, rows, max_new_tokens, eos, threads)
        same = [a == b for a, b in zip(r["tokens"], hf["tokens"])]
        first = [None if s else next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for s, a, b in zip(same, r["tokens"], hf["tokens"])]
        r |= {
            "format": f"GGUF {quant}", "size_bytes": path.stat().st_size, "ppl": math.exp(r["nll"]),
            "tokens_identical": same, "all_identical": all(same), "first_divergence": first,
            # where greedy paths part: how far apart the HF model put its own token and the GGUF's
            # (a small gap is a near-tie that any rounding can flip; a large one would be a real error)
            "hf_logit_gap_at_divergence": [None if d is None else _logit_gap(model, p + h[:d], h, g, d)
                                           for d, p, h, g in zip(first, prompt_ids, hf["tokens"], r["tokens"])],
            "ppl_delta": math.exp(r["nll"]) - math.exp(hf["nll"]),
        }
        report["models"][quant] = r
    return report


def _logit_gap(model, ids: list[int], hf_tokens: list[int], gguf_tokens: list[int], d: int) -> float | None:
    """HF logit of its own token minus that of the GGUF's token at step `d` (None: one sequence just ended)."""
    import torch

    if d >= len(hf_tokens) or d >= len(gguf_tokens):
        return None
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
    return float(logits[hf_tokens[d]] - logits[gguf_tokens[d]])


def check_table(report: dict[str, Any]) -> str:
    """The check as a markdown table (benchmarks/gguf_toy.md, the stage's printout)."""
    hf = report["models"]["hf"]
    n = len(report["prompts"])
    lines = ["| model | size on disk | held-out ppl | ppl delta vs HF | greedy tokens = HF | HF logit gap where they part | CPU tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for key, m in report["models"].items():
        same = f"{n}/{n} (reference)" if key == "hf" else f"{sum(m['tokens_identical'])}/{n}"
        delta = "" if key == "hf" else f"{m['ppl_delta']:+.4f} ({m['ppl_delta'] / hf['ppl']:+.2%})"
        gaps = ", ".join(f"{g:.3f} @{d}" for g, d in zip(m.get("hf_logit_gap_at_divergence", []), m.get("first_divergence", []))
                         if g is not None)
        lines.append(f"| {m['format']} | {m['size_bytes'] / 2**20:.2f} MiB | {m['ppl']:.4f} | {delta} | {same} | {gaps} | "
                     f"{m['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def _main(argv: Sequence[str]) -> None:
    if argv[:1] == ["convert"]:
        _converter_main(argv[1:])
    elif argv[:1] == ["child"] and len(argv) == 2:
        _child_main(argv[1])
    else:
        sys.exit("usage: python -m elastic.gguf convert LLAMA_CPP_DIR PRE as-written|autoconfig MODEL_DIR [converter args]  (used by export_gguf)\n"
                 "       python -m elastic.gguf child RESULT_FILE < pickled call  (used by in_child)")


if __name__ == "__main__":
    # The module as `elastic.gguf`, not `__main__`: the child's functions and GGUFError arrive pickled under
    # that name, and an exception class of a second copy (`__main__.GGUFError`) would not be the one caught.
    from elastic.gguf import _main as main

    main(sys.argv[1:])
