"""Benchmark: which half of a MoE's routed experts to keep -- our ranking vs random vs routed frequency (issue #22).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/bench_moe_toy.py                # ~5 min on one CPU thread
    python scripts/bench_moe_toy.py --steps 200 --out /tmp/moe_toy.json          # quicker, noisier

A small MoE NemotronH (Mamba, MoE and attention layers as in Nemotron 3 Nano 30B-A3B: 8 routed experts,
top-2, one shared expert, sigmoid router with a correction bias) is trained on the toy's Shakespeare
split by the toy builder's own trainer (`elastic.toy.build_toy_parent`: its tokenizer, data, AdamW and
schedule; only the config differs). The router's correction bias is updated as in NVIDIA's training
(aux-loss-free balancing, DeepSeek-V3 style: after each step, bias += rate * sign(mean load - load)), so
that routing does not collapse onto a few experts, which would make any ranking trivial.

Then every MoE layer keeps half of its experts (router rows, correction bias and stacked expert weights
sliced by `slice_model`; every other axis kept whole) chosen by

- (a) our ranking: ``share_gate_norm``, each expert's routed-token share x mean gate weight x mean output
  norm on calibration data (the importance stage's ``experts.<l>`` score);
- (b) random, one seed per run;
- (c) routed frequency alone (``experts_frequency.<l>``, the routed-token share);

and the held-out loss (nats/token, plays never used for training or calibration) is compared. No
training after dropping. As a check that the ranking carries signal, the half it ranks lowest is kept
too. Writes JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from elastic import toy  # noqa: E402
from elastic.data import load_text, pack_tokens  # noqa: E402
from elastic.importance import width_scores  # noqa: E402
from elastic.losses import heldout_loss  # noqa: E402
from elastic.models.nemotron_h import Ranking, arch_of, expert_scores, make_arch, slice_model  # noqa: E402

KINDS = {"M": "linear_attention", "-": "mlp", "*": "full_attention", "E": "moe"}
PATTERN = "MEM*EMEME"  # the toy's depth with its MLP layers as MoE (the real parent has no dense MLP layers)
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
           moe_shared_expert_intermediate_size=128, n_group=1, topk_group=1, norm_topk_prob=True,
           routed_scaling_factor=2.5)
BIAS_RATE = 1e-3  # correction-bias update per step (DeepSeek-V3's gamma)


def balance_routers(model, rate: float) -> list:
    """Forward hooks on every MoE router that, in training, move its correction bias towards equal load:
    one update per forward (the toy trainer does one forward per optimizer step). The bias only picks the
    top-k (the gate weights come from the unbiased scores), so it gets no gradient; NVIDIA updates it so."""

    def hook(router, _inputs, out):
        if router.training:
            load = torch.bincount(out[2].flatten(), minlength=router.num_experts).float()
            with torch.no_grad():
                router.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))

    return [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__ == "NemotronHTopkRouter"]


def train_parent(out: Path, steps: int, seed: int) -> Path:
    """The toy builder with a MoE config and balanced routers; cached in `out` by the settings and this config."""
    from transformers import NemotronHForCausalLM

    config_of = toy.toy_config
    toy.toy_config = lambda vocab, **kw: config_of(vocab, **{"layers_block_type": [KINDS[c] for c in PATTERN], **MOE, **kw})
    init = NemotronHForCausalLM.__init__

    def init_balanced(self, config):
        init(self, config)
        balance_routers(self, BIAS_RATE)

    NemotronHForCausalLM.__init__ = init_balanced
    try:
        return toy.build_toy_parent(out, steps=steps, batch_size=16, seq_len=64, lr=3e-3, vocab_size=512, seed=seed)
    finally:
        toy.toy_config, NemotronHForCausalLM.__init__ = config_of, init


def split(tok, name: str, seq_len: int, n: int) -> list[torch.Tensor]:
    rows = pack_tokens(load_text(toy.toy_files(name)), tok, seq_len, seed=0, max_sequences=n)
    return list(torch.split(rows, 16))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps of the MoE parent (16 x 64 tokens each)")
    ap.add_argument("--seeds", type=int, default=3, help="random expert choices")
    ap.add_argument("--keep", type=float, default=0.5, help="share of each layer's routed experts kept")
    ap.add_argument("--calib", type=int, default=64, help="calibration sequences (64 tokens) for the rankings")
    ap.add_argument("--heldout", type=int, default=256, help="held-out sequences (64 tokens)")
    ap.add_argument("--work", default=str(Path(os.environ.get("ELASTIC_CACHE", "~/.cache/elastic")).expanduser() / "moe_toy"))
    ap.add_argument("--out", default="benchmarks/moe_toy.json")
    args = ap.parse_args(argv)
    t0 = time.time()

    key = hashlib.sha1(json.dumps([PATTERN, MOE, BIAS_RATE], sort_keys=True).encode()).hexdigest()[:10]
    path = train_parent(Path(args.work) / f"parent-{key}", args.steps, seed=0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    built = json.loads((path / "toy_parent.json").read_text())
    parent = arch_of(model)
    calib, held = split(tok, "calib", 64, args.calib), split(tok, "heldout", 64, args.heldout)

    scores = width_scores(model, calib, progress=False)
    scores["depth_mse"] = torch.zeros(parent.num_layers)  # no layer is dropped here: any depth order will do
    ours = Ranking.from_scores(expert_scores(scores, "share_gate_norm"), parent)
    freq = Ranking.from_scores(expert_scores(scores, "frequency"), parent)
    keep = int(round(parent.n_routed_experts * args.keep))
    child = make_arch(parent, ours, n_routed_experts=keep)

    def loss_with(ranking) -> float:
        return heldout_loss(slice_model(model, child, ranking), held)

    def random_experts(seed: int) -> Ranking:  # ours on every other axis (all kept whole), random experts
        g = torch.Generator().manual_seed(seed)
        width = dict(ours.width)
        width["experts"] = {i: torch.stack([torch.randperm(n, generator=g) for _ in range(r.shape[0])])
                            for i, r in ours.width["experts"].items() for n in [r.shape[1]]}
        return dataclasses.replace(ours, width=width)

    def reversed_experts(r: Ranking) -> Ranking:  # the least important experts first: does the order carry signal?
        return dataclasses.replace(r, width={**r.width, "experts": {i: t.flip(-1) for i, t in r.width["experts"].items()}})

    moe_layers = sorted(ours.width["experts"])
    share = {i: scores[f"experts_frequency.{i}"] / scores[f"experts_frequency.{i}"].sum() for i in moe_layers}
    kept = {name: {i: sorted(r.width["experts"][i][0, :keep].tolist()) for i in moe_layers}
            for name, r in (("ours", ours), ("frequency", freq))}
    random_losses = [loss_with(random_experts(s)) for s in range(args.seeds)]
    result = {
        "command": "OMP_NUM_THREADS=1 nice -n 10 python scripts/bench_moe_toy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch threads {torch.get_num_threads()}",
        "parent": {"path": str(path), "pattern": PATTERN, **MOE, "params": parent.num_params(),
                   "active_params": parent.active_params(), "heldout_loss_toy": built["heldout_loss"],
                   "unigram_loss": built["unigram_loss"], "tokens_seen": built["tokens_seen"],
                   "train_seconds": built["train_seconds"], "steps": args.steps, "bias_rate": BIAS_RATE},
        "child": {"n_routed_experts": keep, "params": child.num_params(), "active_params": child.active_params()},
        "calibration_tokens": sum(b.numel() for b in calib), "heldout_tokens": sum(b.numel() for b in held),
        "heldout_loss": {"parent": heldout_loss(model, held), "ours": loss_with(ours), "frequency": loss_with(freq),
                         "ours_reversed": loss_with(reversed_experts(ours)),
                         "random": random_losses, "random_mean": sum(random_losses) / len(random_losses)},
        "kept_experts": kept,
        "routed_share": {i: [round(v, 4) for v in share[i].tolist()] for i in moe_layers},
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    h = result["heldout_loss"]
    print(f"| experts kept per MoE layer | choice | held-out loss | vs parent |\n|---|---|---|---|")
    print(f"| {parent.n_routed_experts}/{parent.n_routed_experts} | (parent) | {h['parent']:.4f} | - |")
    for name, v in (("(a) our ranking (share x gate x output norm)", h["ours"]),
                    (f"(b) random, mean of {args.seeds}", h["random_mean"]),
                    ("(c) routed frequency alone", h["frequency"]),
                    ("(check) our ranking reversed: the least important half kept", h["ours_reversed"])):
        print(f"| {keep}/{parent.n_routed_experts} | {name} | {v:.4f} | +{v - h['parent']:.4f} |")
    print(f"random per seed: {[round(v, 4) for v in random_losses]}; wrote {args.out} [{result['seconds']}s]")
    return result


if __name__ == "__main__":
    main()
