"""Benchmark: can a model of the toy's size learn pass-key retrieval within the toy's step budget?

    OMP_NUM_THREADS=1 python scripts/bench_passkey_learn.py --arch nemotron_h --adjacent 0 --fraction 1 --weight 30
    OMP_NUM_THREADS=1 python scripts/bench_passkey_learn.py --arch llama --adjacent 0 --fraction 1 --weight 30

Trains a model from scratch on the toy's Shakespeare rows (TOY_DEFAULTS tokenizer, 128-token rows,
batch 16, lr 3e-3, cosine) where a share `--fraction` of the rows carries `--pairs` digit pass keys,
each as the evaluate stage's needle written twice (the second copy's key is predictable only from the
first; `--adjacent` = share of copies that directly follow their needle). The second copies' key
tokens weigh `--weight` in the loss. Every 50 steps it prints the mean log-probability of the key at
the second copy on 32 held-out rows built the same way (uniform over the digit keys = no retrieval),
and saves the model, which `scripts/bench_passkey.py --parent OUT --keys digits` then scores against
a random model. `--arch nemotron_h` is the toy's NemotronH (elastic.toy.toy_config);
`--arch llama` a Llama of the same width (4 layers, RoPE) for comparison. This is a study, not the
toy's recipe: the shipped toy is trained on the plays alone (benchmarks/passkey_toy.md).
"""

import argparse
import math
import random
import time
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from elastic import toy
from elastic.data import load_text, pack_tokens
from elastic.evaluation import passkey
from elastic.losses import heldout_loss
from elastic.parent import load_tokenizer

from bench_passkey import toy_parent  # scripts/ is on the path when a script runs


class Rows:
    """Splices digit pass keys into rows: needle, then later the same needle; returns the answers' positions."""

    def __init__(self, tok, pairs: int, adjacent: float, seed: int):
        self.k = passkey.keys(tok, "digits")
        self.pairs, self.adjacent, self.rng = pairs, adjacent, random.Random(seed)

    def __call__(self, text: list[int]) -> tuple[list[int], list[int]]:
        pieces = []
        for _ in range(self.pairs):
            needle = self.k.prefix + [self.rng.choice(self.k.ids)] + self.k.suffix
            pieces += [needle, needle]
        room = len(text) - sum(map(len, pieces))
        cuts = sorted(self.rng.randint(0, room) for _ in pieces)
        for i in range(0, len(cuts), 2):
            if self.rng.random() < self.adjacent:
                cuts[i + 1] = cuts[i]
        out, answers, prev = [], [], 0
        for i, (cut, piece) in enumerate(zip(cuts, pieces)):
            out += text[prev:cut]
            if i % 2:
                answers.append(len(out) + len(self.k.prefix))
            out += piece
            prev = cut
        return out + text[prev:room], answers


def model_for(arch: str, vocab: int):
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    from transformers import NemotronHForCausalLM
    return NemotronHForCausalLM(toy.toy_config(vocab))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["nemotron_h", "llama"], default="nemotron_h")
    ap.add_argument("--fraction", type=float, default=1.0, help="share of rows carrying pass keys")
    ap.add_argument("--pairs", type=int, default=2, help="key pairs per carrying row")
    ap.add_argument("--adjacent", type=float, default=0.0, help="share of copies right after their needle")
    ap.add_argument("--weight", type=float, default=30.0, help="loss weight of the second copies' keys")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--out", default=None, help="where to save the model (default: /tmp/passkey-learn-<settings>)")
    args = ap.parse_args()
    tok = load_tokenizer(toy_parent("default"))  # the TOY_DEFAULTS parent's tokenizer
    train = pack_tokens(load_text(toy.toy_files("train")), tok, 128, seed=0)
    held = pack_tokens(load_text(toy.toy_files("heldout")), tok, 128, seed=0, max_sequences=64)
    rows = Rows(tok, args.pairs, args.adjacent, seed=0)
    probe_rows = Rows(tok, 1, args.adjacent, seed=1)
    probe = [probe_rows(r.tolist()) for r in held[:32]]
    probe_ids = torch.tensor([r for r, _ in probe])
    torch.manual_seed(0)
    model = model_for(args.arch, len(tok)).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, int(0.05 * args.steps), args.steps)
    g = torch.Generator().manual_seed(0)
    order, cursor, t0 = torch.randperm(train.shape[0], generator=g), 0, time.time()
    uniform = -math.log(len(rows.k.ids))

    @torch.no_grad()
    def probe_logp() -> float:
        model.eval()
        logp = model(input_ids=probe_ids, use_cache=False).logits.log_softmax(-1)
        model.train()
        return sum(logp[i, a - 1, probe_ids[i, a]].item() for i, (_, (a,)) in enumerate(probe)) / len(probe)

    for step in range(args.steps):
        if cursor + 16 > order.numel():
            order, cursor = torch.randperm(train.shape[0], generator=g), 0
        x = train[order[cursor:cursor + 16]].clone()
        cursor += 16
        w = torch.ones(x.shape)
        for i in range(x.shape[0]):
            if rows.rng.random() < args.fraction:
                r, answers = rows(x[i].tolist())
                x[i], w[i, answers] = torch.tensor(r), args.weight
        logp = model(input_ids=x, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
        loss = (nll * w[:, 1:]).sum() / w[:, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}; key log-p at the second copy {probe_logp():.3f} "
                  f"(uniform over {len(rows.k.ids)} keys {uniform:.3f}); {time.time() - t0:.0f} s", flush=True)
    print(f"held-out loss on plain plays: {heldout_loss(model, list(torch.split(held, 16))):.3f}")
    out = Path(args.out or f"/tmp/passkey-learn-{args.arch}-f{args.fraction}-a{args.adjacent}-w{args.weight}-s{args.steps}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved -> {out}")


if __name__ == "__main__":
    main()
