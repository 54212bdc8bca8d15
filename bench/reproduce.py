#!/usr/bin/env python3
"""Does a change reproduce the benchmark? Two folders of bench/pipeline.py result files (one JSON per target, the
same split), measured with the code before and after: per target and method, Dice per label group, wall and CPU
seconds, peak MB and the load at the start, and the differences after - before. Writes the comparison as JSON
(``--json``) and prints one table.

    .venv/bin/python bench/reproduce.py --before docs/results/redesign/ixi-tuning-95ef698 \\
        --after docs/results/pipeline/ixi-tuning --json docs/results/redesign/ixi-tuning.json

Issue #20's bar: Dice within 0.002 of the code before on every target, time not slower. Times taken at different
loads are not comparable on their own: the table shows the load next to them and the CPU seconds, which
depend less on it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MASRefineLib.jsonio import write_json  # noqa: E402


def _rows(folder: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for p in sorted(folder.glob("*.json")):
        doc = json.loads(p.read_text())
        for method, m in doc["methods"].items():
            out[(doc["target"], method)] = m
    return out


def compare(before: Path, after: Path) -> dict:
    b, a = _rows(before), _rows(after)
    rows = []
    for key in sorted(set(b) & set(a)):
        mb, ma = b[key], a[key]
        groups = {g: {"before": mb["metrics"][g]["dice"], "after": ma["metrics"][g]["dice"],
                      "diff": ma["metrics"][g]["dice"] - mb["metrics"][g]["dice"]} for g in ma["metrics"]}
        rows.append({"target": key[0], "method": key[1], "dice": groups,
                     **{f"{k}_{side}": m.get(k) for k in ("seconds", "cpu_seconds", "peak_mb", "load_at_start")
                        for side, m in (("before", mb), ("after", ma))},
                     "commit_before": mb.get("commit"), "commit_after": ma.get("commit")})
    worst = max((abs(d["diff"]) for r in rows for d in r["dice"].values()), default=None)
    return {"before": str(before.relative_to(ROOT) if before.is_relative_to(ROOT) else before),
            "after": str(after.relative_to(ROOT) if after.is_relative_to(ROOT) else after),
            "rows": rows, "max_abs_dice_diff": worst,
            "missing": sorted({f"{t}/{m}" for t, m in set(b) ^ set(a)})}


def table(c: dict) -> str:
    lines = ["| target | method | group | Dice before | Dice after | diff | wall s before / after | CPU s before / after "
             "| peak MB before / after | load before / after |", "|" + " --- |" * 10]
    for r in c["rows"]:
        for g, d in r["dice"].items():
            lines.append(f"| {r['target']} | {r['method']} | {g} | {d['before']:.4f} | {d['after']:.4f} | {d['diff']:+.4f} "
                         f"| {r['seconds_before']:.0f} / {r['seconds_after']:.0f} "
                         f"| {(r['cpu_seconds_before'] or 0):.0f} / {(r['cpu_seconds_after'] or 0):.0f} "
                         f"| {(r['peak_mb_before'] or 0):.0f} / {(r['peak_mb_after'] or 0):.0f} "
                         f"| {(r['load_at_start_before'] or 0):.1f} / {(r['load_at_start_after'] or 0):.1f} |")
    sec = [(r["seconds_after"] / r["seconds_before"]) for r in c["rows"] if r["seconds_before"]]
    cpu = [(r["cpu_seconds_after"] / r["cpu_seconds_before"]) for r in c["rows"] if r.get("cpu_seconds_before")]
    lines += ["", f"Largest |Dice difference|: {c['max_abs_dice_diff']:.4f}" if c["max_abs_dice_diff"] is not None else "",
              f"Wall after/before: median {statistics.median(sec):.2f}" if sec else "",
              f"CPU after/before: median {statistics.median(cpu):.2f}" if cpu else "",
              f"Only on one side: {', '.join(c['missing'])}" if c["missing"] else ""]
    return "\n".join(x for x in lines if x is not None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    c = compare(a.before.resolve(), a.after.resolve())
    if a.json:
        write_json(c, a.json)
    print(table(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
