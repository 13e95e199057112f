"""Convert BIG-bench multiple-choice tasks to the JSONL files shipped in elastic/evaluation/tasks/data/.

    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d /tmp/bb && tar xzf /tmp/bb/bigbench-1.0.0.tar.gz -C /tmp/bb
    python scripts/bigbench_to_jsonl.py /tmp/bb/bigbench-1.0.0/bigbench/benchmark_tasks --n 200

Each line: {"question": str, "choices": [str, ...], "label": int}. A fixed seeded subset of `n`
examples per task keeps the shipped files small (and toy evaluation fast); the order of the choices
is BIG-bench's own.
"""

import argparse
import json
import random
from pathlib import Path

TASKS = {"social_iqa": "social_iqa", "winowhy": "winowhy"}  # shipped name -> BIG-bench folder


def convert(task_json: Path, n: int, seed: int) -> list[dict]:
    task = json.loads(task_json.read_text())
    rows = []
    for ex in task["examples"]:
        choices = list(ex["target_scores"])
        best = [i for i, c in enumerate(choices) if ex["target_scores"][c] == 1]
        if len(best) != 1:
            continue  # not single-answer multiple choice
        rows.append({"question": ex["input"].strip(), "choices": choices, "label": best[0]})
    random.Random(seed).shuffle(rows)
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks_dir", type=Path, help="bigbench/benchmark_tasks of the extracted sdist")
    ap.add_argument("--n", type=int, default=200, help="examples kept per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "elastic/evaluation/tasks/data")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, folder in TASKS.items():
        rows = convert(args.tasks_dir / folder / "task.json", args.n, args.seed)
        with open(args.out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}: {len(rows)} examples -> {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
