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
import functools
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "pipeline"
DOC = ROOT / "docs" / "results" / "pipeline.md"
README = ROOT / "README.md"
OURS = "masrefine"


def _current(method: dict) -> bool:
    """A peer's row counts only when it was run with the peer's parameters of today (bench/peers.py): a row
    measured with withdrawn parameters (greedy's ``-moments 2`` initialisation, which failed on knees) is never
    rendered, and is replaced when bench/pipeline.py runs the peer again."""
    key = method.get("key") or {}
    return "peer" not in key or key.get("params") == _peer_params(key["peer"])


@functools.lru_cache(maxsize=None)
def _peer_params(peer: str):
    """bench/peers.py's parameters of ``peer`` as they read back from a result file (JSON types)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    import peers
    return json.loads(json.dumps(peers.params(peer)))


def _load(dataset: str, split: str) -> list[dict]:
    recs = [json.loads(p.read_text()) for p in sorted((RESULTS / f"{dataset}-{split}").glob("*.json"))]
    for r in recs:
        r["methods"] = {k: m for k, m in r["methods"].items() if _current(m)}
    return recs


# the methods, in table order, with their names in tables (bench/pipeline.py runs them)
LABELS = {
    "masrefine": "MASRefine (default: deformable + I + JLF)",
    "masrefine-fast": "MASRefine --preset fast (+ I + JLF)",
    "masrefine-greedy": "MASRefine, greedy-style registration (preset greedy: + I + JLF)",
    "masrefine-paper": "MASRefine paper (deformable + IS + VoteNet+)",
    "ants-pv": "ANTs SyN (antspyx defaults) + plurality vote",
    "ants-jlf": "ANTs SyN (antspyx defaults) + antsJointFusion",
    "greedy-jlf": "greedy + our JLF",
}
ORDER = tuple(LABELS)


def _ms(vals: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± sd`` of the defined values ("–" for the sd of a single value, "–" for none)."""
    import statistics
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "–"
    sd = f"{statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else "–"
    return f"{statistics.fmean(vals):.{digits}f} ± {sd}"


def groups_of(recs: list[dict]) -> list[str]:
    for r in recs:
        for m in r["methods"].values():
            return [g for g in m["metrics"] if g != "mean"] or ["mean"]
    return ["mean"]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def render(dataset: str, split: str) -> str:
    """The markdown of one data set and split ("" when it has no results).

    The main table is over the targets that have every method (so each row is over the same targets); while
    none has them all, each method is shown over its own targets (the "targets" column says how many). Paired
    differences use the targets both methods have; wall-time ratios only pairs timed in the same invocation."""
    recs = _load(dataset, split)
    if not recs:
        return ""
    methods = [m for m in ORDER if any(m in r["methods"] for r in recs)]
    full = [r for r in recs if all(m in r["methods"] for m in methods)]
    own = not full
    shown = recs if own else full
    gs = groups_of(shown)
    gname = {"mean": "all labels"}
    first = next(m for r in shown for m in r["methods"].values())
    title = (f"{len(full)} with every method" if not own else "no target has every method yet") + \
        f"; targets: {', '.join(r['target'] for r in shown)}"
    lines = [f"### {dataset}, {split} targets ({title})", "",
             f"{len(shown[0]['atlases'])} atlases (bench/datasets.py), {first['threads']} threads on a "
             f"{first.get('cores', '?')}-core machine; mean ± sd over targets; Dice and surface Dice in %, distances in "
             "mm; peak MB of the method's process (the two ANTs fusions share one).", ""]
    head = ["method"] + [f"Dice {gname.get(g, g)}" for g in gs] + [f"surface Dice {gname.get(g, g)}" for g in gs] + \
        [f"ASD {gname.get(g, g)}" for g in gs] + [f"HD95 {gname.get(g, g)}" for g in gs] + \
        ["undefined distances", "wall s", "CPU s", "peak MB", "targets"]
    body = []
    for m in methods:
        rows = [r["methods"][m] for r in shown if m in r["methods"]]
        cells = [LABELS.get(m, m)]
        for key, scale, digits in (("dice", 100, 1), ("surface_dice", 100, 1), ("asd_mm", 1, 2), ("hd95_mm", 1, 2)):
            cells += [_ms([x["metrics"][g][key] for x in rows], scale, digits) for g in gs]
        und = sum(x["metrics"]["mean"]["n_undefined"] for x in rows)
        nlab = sum(x["metrics"]["mean"]["n_labels"] for x in rows)
        cells += [f"{und} of {nlab}", _ms([x["seconds"] for x in rows], 1, 0), _ms([x["cpu_seconds"] for x in rows], 1, 0),
                  _ms([x["peak_mb"] for x in rows], 1, 0), str(len(rows))]
        body.append(cells)
    lines += _table(head, body)
    if OURS in methods and len(methods) > 1:
        lines += ["", f"Paired per-target differences, {LABELS[OURS]} minus each method (Dice in points; wall time as "
                  "theirs / ours, over the targets where both were timed in the same invocation):", ""]
        head = ["against", "targets"] + [f"Δ Dice {gname.get(g, g)}" for g in gs] + \
            [f"ahead on (Dice {gname.get(g, g)})" for g in gs] + [f"Δ surface Dice {gname.get(gs[0], gs[0])}", "wall-time ratio"]
        body = []
        for p in methods:
            if p == OURS:
                continue
            pair = [r for r in recs if OURS in r["methods"] and p in r["methods"]]
            if not pair:
                continue
            d = {g: [r["methods"][OURS]["metrics"][g]["dice"] - r["methods"][p]["metrics"][g]["dice"] for r in pair] for g in gs}
            sd = [r["methods"][OURS]["metrics"][gs[0]]["surface_dice"] - r["methods"][p]["metrics"][gs[0]]["surface_dice"]
                  for r in pair]
            same = [r for r in pair if r["methods"][OURS].get("run") == r["methods"][p].get("run")]
            ratio = [r["methods"][p]["seconds"] / r["methods"][OURS]["seconds"] for r in same]
            body.append([LABELS.get(p, p), str(len(pair))] + [_ms(d[g], 100, 2) for g in gs] +
                        [f"{sum(x > 0 for x in d[g])} of {len(pair)}" for g in gs] +
                        [_ms(sd, 100, 2), (_ms(ratio, 1, 2) + f"× ({len(same)})") if same else "not timed together"])
        lines += _table(head, body)
        # the outcome in words, from the same numbers (the first label group decides)
        for k, g in enumerate(gs):
            ahead = [f"of {b[0]} on {b[2 + len(gs) + k]} targets" for b in body]
            lines += ["", f"In words (Dice, {gname.get(g, g)}): the default is ahead " + ", ".join(ahead) + "."]
    # the warps before fusion: each atlas's Dice, mean over atlases and targets (one registration per peer)
    warp_rows, seen = [], set()
    for m in methods:
        proc = "ants" if m.startswith("ants") else m
        stages = sorted({st for r in shown for st in r["methods"].get(m, {}).get("per_atlas_dice", {})}, reverse=True)
        for st in stages:
            if (proc, st) in seen:
                continue
            seen.add((proc, st))
            per = [r["methods"][m]["per_atlas_dice"][st] for r in shown if r["methods"].get(m, {}).get("per_atlas_dice", {}).get(st)]
            vals = {g: [d[g] for t in per for d in t.values()] for g in gs}
            name = {"ants": "ANTs SyN", "greedy-jlf": "greedy", "masrefine": "MASRefine"}.get(
                proc, f"MASRefine {proc.removeprefix('masrefine-')}")  # e.g. "MASRefine greedy"
            warp_rows.append([f"{name}, {st}"] + [_ms(vals[g], 100, 1) for g in gs] + [str(len(per))])
    if warp_rows:
        lines += ["", "Warped atlases before fusion: Dice of each atlas against the target's truth (mean ± sd over "
                  "atlases and targets, %):", ""]
        lines += _table(["warps"] + [f"Dice {gname.get(g, g)}" for g in gs] + ["targets"], warp_rows)
    ms = [m for r in shown for m in r["methods"].values()]
    commits = sorted({m["commit"] for m in ms})
    codes = sorted({m.get("code", "unrecorded") for m in ms})
    dates = sorted({m["date"] for m in ms})
    loads = [m["load_at_start"] for m in ms]
    lines += ["", f"Measured at commit(s) {', '.join(commits)} (numerical code {', '.join(codes)}) on {', '.join(dates)}; "
              f"load average at the start of a method {min(loads):.1f}–{max(loads):.1f}. "
              f"Source: `docs/results/pipeline/{dataset}-{split}/`.", ""]
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
