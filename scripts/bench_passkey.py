"""Benchmark: pass-key accuracy of the trained toy parent vs a randomly initialised model of its shape.

    OMP_NUM_THREADS=1 python scripts/bench_passkey.py --lengths 32 64 128 256 512 --trials 24

Uses the evaluate stage's own scorer (elastic.evaluation.passkey, contrastive over 4 candidates, chance
0.25) on held-out plays; prints a markdown table with a binomial standard error per cell.
"""

import argparse
import math
import time

import torch
from transformers import AutoModelForCausalLM

from elastic import toy
from elastic.data import load_text, pack_tokens
from elastic.evaluation import passkey
from elastic.parent import load_model, load_tokenizer
from elastic.toy import TOY_DEFAULTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default=None, help="checkpoint; default: the cached toy parent (built if missing)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.5])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.parent is None:
        from pathlib import Path
        import hashlib, json
        key = hashlib.sha256(json.dumps(TOY_DEFAULTS, sort_keys=True).encode()).hexdigest()[:10]
        args.parent = toy.build_toy_parent(Path("~/.cache/elastic/toy").expanduser() / f"parent-{key}", **TOY_DEFAULTS)
    trained, tok = load_model(args.parent), load_tokenizer(args.parent)
    torch.manual_seed(args.seed)
    random_init = AutoModelForCausalLM.from_config(trained.config).eval()
    hay = pack_tokens(load_text(toy.toy_files("heldout")), tok, max(args.lengths), seed=args.seed).flatten()
    print("| length | depth | prompts | trained | random | seconds |\n|---|---|---|---|---|---|")
    for n in args.lengths:
        for d in args.depths:
            t0 = time.time()
            trials = passkey.build_trials(tok, hay, n, d, args.trials, 4, args.seed)
            a, b = passkey.accuracy(trained, trials, 16), passkey.accuracy(random_init, trials, 16)
            k = trials.ids.shape[0] * trials.ids.shape[1]
            se = lambda p: math.sqrt(p * (1 - p) / k)  # noqa: E731
            print(f"| {n} | {d} | {k} | {a:.3f} ± {se(a):.3f} | {b:.3f} ± {se(b):.3f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
