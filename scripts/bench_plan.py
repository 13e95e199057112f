"""Benchmark: `elastic.plan`'s per-GPU peak vs a fake-tensor trace of the real step (tests/memtrace.py), on
reduced-depth models of the real widths. No GPU, no weights: minutes on 2 CPU cores.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_plan.py > benchmarks/plan_trace.md

Each line: the step (distill: 4B-wide student + 9B-wide teacher; search: the 9B-wide elastic student with a
4096-token vocabulary, see tests/test_plan.py), the layer pattern, micro-batch x context, activation
checkpointing, the plan's peak and the moment it falls in, the trace's peak, and their ratio.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CASES = [  # (step, pattern, micro-batch, seq_len, checkpointing)
    ("distill", "M-*", 1, 8192, True),
    ("distill", "M-*", 1, 8192, False),
    ("distill", "M-M*-M-", 2, 8192, True),
    ("distill", "M-M*-M-", 1, 8192, False),
    ("search", "M-*", 1, 8192, False),
]


def main() -> None:
    from hydra import compose, initialize_config_dir
    from memtrace import trace_distill, trace_search
    from test_plan import _config, _one_replica

    from elastic.models.nemotron_h import Arch
    from elastic.plan import GiB, Shape
    from elastic.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=nemotron_9b_to_4b", "parent.path=/x", "search.log_choices_every=1000"])
    print("| step | layers | micro x seq | ckpt | plan GiB (moment) | trace GiB | plan / trace | trace s |")
    print("|---|---|---|---|---|---|---|---|")
    for step, pattern, micro, seq, ckpt in CASES:
        t0 = time.time()
        if step == "distill":
            s_cfg = _config("nemotron-3-nano-4b.config.json", pattern)
            t_cfg = _config("nemotron-nano-9b-v2.config.json", pattern)
            trace = trace_distill(s_cfg, t_cfg, seq_len=seq, micro_batch=micro, chunk_size=1024, checkpointing=ckpt)
            plan = _one_replica(Arch.from_config(s_cfg), Arch.from_config(t_cfg), Shape(micro, seq), chunk=s_cfg.chunk_size,
                                checkpointing=ckpt, loss_chunk=1024, elastic=False)
        else:
            p_cfg = _config("nemotron-nano-9b-v2.config.json", pattern, vocab_size=4096)
            c = cfg.search.copy()
            c.seq_len, c.micro_batch_size = seq, micro
            trace = trace_search(p_cfg, c, micro_batch=micro, checkpointing=ckpt)
            a = Arch.from_config(p_cfg)
            plan = _one_replica(a, a, Shape(micro, seq), chunk=p_cfg.chunk_size, checkpointing=ckpt,
                                loss_chunk=int(c.loss_chunk_size), elastic=True)
        print(f"| {step} | {pattern} | {micro} x {seq} | {'yes' if ckpt else 'no'} | {plan.peak_bytes / GiB:.2f} "
              f"({plan.peak_phase}) | {trace['Total'] / GiB:.2f} | {plan.peak_bytes / trace['Total']:.3f} | {time.time() - t0:.0f} |",
              flush=True)
        print(json.dumps({k: round(v / GiB, 2) for k, v in trace.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
