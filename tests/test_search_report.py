"""scripts/search_report.py: the benchmark tables are computed from the result files, not typed in."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "search_report.py"
spec = importlib.util.spec_from_file_location("search_report", SCRIPT)
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def result(seed, elastic, alone=None, family_only=False):
    """A bench_search.py result with budgets 0.5 and 1.0 (only the keys the report reads)."""
    small = {"budget": 0.5, "router_arch": "r", "grid_arch": "g", "elastic_loss": elastic, "oneshot_loss": 5.0}
    if not family_only:
        small |= {"alone_loss": alone, "alone_steps": 10, "router_alone_loss": elastic + 0.01}
    return {
        "command": f"python scripts/bench_search.py seed={seed}", "machine": "m", "date": "d",
        "parent_heldout_loss": 4.0, "search_seconds": 1.0, "search_steps": 30, "tokens_per_step": 8,
        "baseline_split": 2, "seed": seed,
        "rows": [small, {"budget": 1.0, "router_arch": "full", "elastic_loss": 4.1}],
    }


def test_seed_table_means_ranges_and_per_seed_differences():
    table = report.seeds_table([result(0, 4.4, 4.5), result(1, 4.6, 4.5)])
    row = next(line for line in table.splitlines() if line.startswith("| 0.5 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "4.500 [4.400, 4.600]"      # elastic
    assert cells[2] == "4.500 [4.500, 4.500]"      # (a)
    assert cells[-1] == "-0.100, +0.100"           # elastic - (a), per seed, in file order
    assert "| 1 " not in table                     # the full model has no baseline to compare with


def test_run_table_bolds_only_a_family_no_worse_than_a():
    assert "**4.400**" in report.run_table(result(0, 4.4, 4.5))
    assert "**" not in report.run_table(result(0, 4.6, 4.5))
    assert "| 0.5 | 4.400 | - | - |" in report.run_table(result(0, 4.4, family_only=True))


def test_compare_table_and_seed_from_old_commands(tmp_path):
    old = result(3, 4.2, family_only=True)
    del old["seed"]  # older results carry the seed in their command only
    table = report.compare_table([("a", [result(0, 4.4, family_only=True), old])])
    assert "| a | 0, 3 | 4.300 [4.200, 4.400] | 4.100 [4.100, 4.100] |" in table
    (tmp_path / "r0.json").write_text(json.dumps(old))
    out = subprocess.run([sys.executable, str(SCRIPT), "--compare", "x=r*.json"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert "| x | 3 |" in out


def test_compare_with_no_matching_file_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--compare", "x=none*.json"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no file matches" in out.stderr
    out = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "give result files" in out.stderr
