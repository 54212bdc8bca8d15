#!/usr/bin/env python3
"""Render the benchmark tables from their result files (never typed by hand).

Reads ``docs/results/pipeline/<dataset>-<split>/*.json`` (written by bench/pipeline.py) and renders, per data
set and split, one markdown table: per method the mean ± sd over targets of Dice, surface Dice, ASD and HD95
per label group (with how many labels had undefined distances), wall and CPU seconds and peak memory; then
the paired per-target differences of MASRefine's default against each peer (mean ± sd, and on how many
targets it is ahead). Only targets where every method shown has a result enter a table, so each row is over
the same targets.

    .venv/bin/python bench/report.py            # print every table and rewrite docs/results/pipeline.md and
                                                # the README's generated block
    .venv/bin/python bench/report.py --check    # exit 1 when those files are not what the results render
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "pipeline"
DOC = ROOT / "docs" / "results" / "pipeline.md"
README = ROOT / "README.md"
ORDER = ("masrefine", "masrefine-paper", "ants-pv", "ants-jlf", "greedy-jlf")
OURS = "masrefine"


def _load(dataset: str, split: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / f"{dataset}-{split}").glob("*.json"))]


def _ms(vals: list[float], scale: float = 1.0, digits: int = 1) -> str:
    import statistics
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "–"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


def groups_of(dataset: str, recs: list[dict]) -> list[str]:
    for r in recs:
        for m in r["methods"].values():
            return [g for g in m["metrics"] if g != "mean"] or ["mean"]
    return ["mean"]


def render(dataset: str, split: str) -> str:
    """The markdown of one data set and split ("" when it has no results)."""
    recs = _load(dataset, split)
    if not recs:
        return ""
    methods = [m for m in ORDER if any(m in r["methods"] for r in recs)]
    # every row over the same targets: those with every method shown
    full = [r for r in recs if all(m in r["methods"] for m in methods)]
    if not full:  # no target has them all yet: show each method on its own targets
        full = recs
    gs = groups_of(dataset, full)
    gname = {"mean": "all labels"}
    lines = [f"### {dataset}, {split} targets ({len(full)}: {', '.join(r['target'] for r in full)})", "",
             f"{len(full[0]['atlases'])} atlases (bench/datasets.py), {full[0]['methods'][methods[0]]['threads']} threads; "
             "mean ± sd over targets; Dice and surface Dice in %, distances in mm.", ""]
    head = ["method"] + [f"Dice {gname.get(g, g)}" for g in gs] + [f"surface Dice {gname.get(g, g)}" for g in gs] + \
        [f"ASD {gname.get(g, g)}" for g in gs] + [f"HD95 {gname.get(g, g)}" for g in gs] + \
        ["undefined distances", "wall s", "CPU s", "peak MB", "targets"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        rows = [r["methods"][m] for r in full if m in r["methods"]]
        cells = [rows[0]["label"]]
        for key, scale, digits in (("dice", 100, 1), ("surface_dice", 100, 1), ("asd_mm", 1, 2), ("hd95_mm", 1, 2)):
            cells += [_ms([x["metrics"][g][key] for x in rows], scale, digits) for g in gs]
        und = sum(x["metrics"]["mean"]["n_undefined"] for x in rows)
        nlab = sum(x["metrics"]["mean"]["n_labels"] for x in rows)
        cells += [f"{und} of {nlab}", _ms([x["seconds"] for x in rows], 1, 0), _ms([x["cpu_seconds"] for x in rows], 1, 0),
                  _ms([x["peak_mb"] for x in rows], 1, 0), str(len(rows))]
        lines.append("| " + " | ".join(cells) + " |")
    if OURS in methods:
        peers = [m for m in methods if m != OURS]
        if peers:
            lines += ["", f"Paired per-target differences, {full[0]['methods'][OURS]['label']} minus each method "
                      "(Dice in points; wall time as a ratio, theirs / ours):", ""]
            head = ["against"] + [f"Δ Dice {gname.get(g, g)}" for g in gs] + [f"ahead on (Dice {gname.get(g, g)})" for g in gs] + \
                ["Δ surface Dice " + gname.get(gs[0], gs[0]), "wall-time ratio"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for p in peers:
                pair = [r for r in full if OURS in r["methods"] and p in r["methods"]]
                d = {g: [r["methods"][OURS]["metrics"][g]["dice"] - r["methods"][p]["metrics"][g]["dice"] for r in pair] for g in gs}
                sd = [r["methods"][OURS]["metrics"][gs[0]]["surface_dice"] - r["methods"][p]["metrics"][gs[0]]["surface_dice"]
                      for r in pair]
                ratio = [r["methods"][p]["seconds"] / r["methods"][OURS]["seconds"] for r in pair]
                cells = [pair[0]["methods"][p]["label"] if pair else p]
                cells += [_ms(d[g], 100, 2) for g in gs]
                cells += [f"{sum(x > 0 for x in d[g])} of {len(pair)}" for g in gs]
                cells += [_ms(sd, 100, 2), _ms(ratio, 1, 2) + "×"]
                lines.append("| " + " | ".join(cells) + " |")
    # the warps before fusion: mean over atlases and targets of each atlas's Dice (one registration per peer)
    warp_rows = []
    seen = set()
    for m in methods:
        proc = {"ants-pv": "ants", "ants-jlf": "ants"}.get(m, m)
        stages = {st for r in full for st in r["methods"].get(m, {}).get("per_atlas_dice", {})}
        for st in sorted(stages, reverse=True):
            if (proc, st) in seen:
                continue
            seen.add((proc, st))
            vals = {g: [d[g] for r in full for d in r["methods"][m].get("per_atlas_dice", {}).get(st, {}).values()]
                    for g in gs}
            n_t = sum(1 for r in full if r["methods"][m].get("per_atlas_dice", {}).get(st))
            label = {"ants": "ANTs SyN"}.get(proc, full[0]["methods"][m]["label"].split(" + ")[0].split(" (")[0])
            warp_rows.append([f"{label}, {st}"] + [_ms(vals[g], 100, 1) for g in gs] + [str(n_t)])
    if warp_rows:
        lines += ["", "Warped atlases before fusion: Dice of each atlas against the target's truth (mean ± sd over "
                  "atlases and targets, %):", ""]
        head = ["warps"] + [f"Dice {gname.get(g, g)}" for g in gs] + ["targets"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in warp_rows]
    commits = sorted({m["commit"] for r in full for m in r["methods"].values()})
    dates = sorted({m["date"] for r in full for m in r["methods"].values()})
    loads = [m["load_at_start"] for r in full for m in r["methods"].values()]
    lines += ["", f"Measured at commit(s) {', '.join(commits)} on {', '.join(dates)}; load average at the start of a "
              f"method {min(loads):.1f}–{max(loads):.1f} on 2 cores. Source: `docs/results/pipeline/{dataset}-{split}/`.", ""]
    return "\n".join(lines)


def render_all() -> str:
    parts = ["# Pipeline benchmark results", "",
             "Generated by `bench/report.py` from the result files beside this page; do not edit. How each method runs: "
             "`bench/pipeline.py` and `bench/peers.py`; the splits: `bench/datasets.py`.", ""]
    for split in ("report", "tuning"):
        for dataset in ("knee", "ixi"):
            t = render(dataset, split)
            if t:
                parts.append(t)
    return "\n".join(parts).rstrip() + "\n"


BLOCK = re.compile(r"(<!-- generated by bench/report.py: begin -->\n).*?(<!-- generated by bench/report.py: end -->)", re.S)


def readme_block() -> str:
    t = "\n".join(x for x in (render("knee", "report"), render("ixi", "report")) if x)
    return t or "No report-target results yet (run the commands above).\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    doc = render_all()
    readme = README.read_text()
    new_readme = BLOCK.sub(lambda m: m.group(1) + readme_block().replace("### ", "#### ") + m.group(2), readme)
    if a.check:
        stale = [str(p) for p, want in ((DOC, doc), (README, new_readme)) if not p.exists() or p.read_text() != want]
        if stale:
            print(f"not rendered from the results: {', '.join(stale)} (run bench/report.py)", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc)
    README.write_text(new_readme)
    print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
