"""Benchmark: pass-key accuracy of a trained toy parent vs a randomly initialised model of its shape.

    OMP_NUM_THREADS=1 python scripts/bench_passkey.py --lengths 32 64 128 256 512 1024 --depths 0 0.5 1 --trials 16
    OMP_NUM_THREADS=1 python scripts/bench_passkey.py --toy test --lengths 32 64 128 256   # the test suite's toy

Uses the evaluate stage's own scorer (elastic.evaluation.passkey, contrastive over 4 candidates, chance
0.25) on held-out plays; prints a markdown table with a binomial standard error per cell. The parent is
`--parent`, or the toy built (once, cached like `python -m elastic.run` does) with TOY_DEFAULTS or TOY_TEST.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from elastic import parent, toy
from elastic.data import load_text, pack_tokens
from elastic.evaluation import passkey
from elastic.parent import load_model, load_tokenizer


def toy_parent(which: str) -> Path:
    """The toy parent of TOY_DEFAULTS or TOY_TEST, in the cache `python -m elastic.run` uses (recipes/toy.yaml)."""
    settings = toy.TOY_DEFAULTS if which == "default" else toy.TOY_TEST
    return parent.toy_parent(settings, Path(os.environ.get("ELASTIC_CACHE", "~/.cache/elastic")) / "toy")


@torch.no_grad()
def repeat_probe(model, hay: torch.Tensor, span: int = 64, rows: int = 32) -> tuple[float, float]:
    """Mean log-probability of a span's tokens, then of the same span repeated right after it: a model
    that copies from its context (an induction head) predicts the second copy far better."""
    x = hay[:rows * span].reshape(rows, span)
    x = torch.cat([x, x], dim=1)
    logp = model(input_ids=x).logits.log_softmax(-1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    return logp[:, :span - 1].mean().item(), logp[:, span:].mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default=None, help="checkpoint; default: the toy parent of --toy (built if missing)")
    ap.add_argument("--toy", choices=["default", "test"], default="default", help="TOY_DEFAULTS or TOY_TEST")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.5])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keys", choices=passkey.KINDS, default="words", help="what the pass keys are (evaluate.passkey.keys)")
    args = ap.parse_args()
    path = Path(args.parent) if args.parent else toy_parent(args.toy)
    trained, tok = load_model(path), load_tokenizer(path)
    report = path / "toy_parent.json"
    if report.is_file():
        r = json.loads(report.read_text())
        print(f"parent {path}: settings {r['settings']}; held-out loss {r['heldout_loss']:.3f} "
              f"(unigram {r['unigram_loss']:.3f}); train {r['train_seconds']:.0f} s wall, {r['train_cpu_seconds']:.0f} s CPU\n")
    torch.manual_seed(args.seed)
    random_init = AutoModelForCausalLM.from_config(trained.config).eval()
    hay = pack_tokens(load_text(toy.toy_files("heldout")), tok, max(args.lengths), seed=args.seed).flatten()
    for name, model in (("trained", trained), ("random", random_init)):
        a, b = repeat_probe(model, hay)
        print(f"{name}: a 64-token held-out span repeated: {a:.2f} nats/token the first time, {b:.2f} the second")
    pool = passkey.keys(tok, args.keys)
    print("| length | depth | prompts | trained | random | seconds |\n|---|---|---|---|---|---|")
    for n in args.lengths:
        for d in args.depths:
            t0 = time.time()
            trials = passkey.build_trials(pool, hay, n, d, args.trials, 4, args.seed)
            a, b = passkey.accuracy(trained, trials, 16), passkey.accuracy(random_init, trials, 16)
            k = trials.ids.shape[0] * trials.ids.shape[1]
            se = lambda p: math.sqrt(p * (1 - p) / k)  # noqa: E731
            print(f"| {n} | {d} | {k} | {a:.3f} ± {se(a):.3f} | {b:.3f} ± {se(b):.3f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
