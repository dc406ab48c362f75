#!/usr/bin/env python3
"""Markdown tables for the README from the experiment results files.

  python3 experiments/tables.py methods [experiments/results/methods.jsonl]
  python3 experiments/tables.py s3delta [experiments/results/s3delta.jsonl]

Scores are printed ×100 (accuracy, Matthews correlation, Pearson). S3Delta cells are the mean and
sample standard deviation over seeds, with the number of seeds when it is not 3.
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

TASK_NAMES = {"sst2": "SST-2", "rte": "RTE", "cola": "CoLA", "stsb": "STS-B", "mrpc": "MRPC"}
SECOND_ORDER = ("s3-L-2nd", "s3-M-2nd")
METRIC_NAMES = {"accuracy": "acc", "matthews": "MCC", "pearson": "Pearson", "f1": "F1", "macro_f1": "macro-F1",
                "spearman": "Spearman"}


def load(path):
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def pct(n, total):
    return f"{100.0 * n / total:.4f}"


def methods_table(path):
    rows = [r for r in load(path) if "error" not in r]
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rows)]
    order = []
    for r in rows:
        if r["method"] not in order:
            order.append(r["method"])
    by = {(r["task"], r["method"]): r for r in rows}
    metric = {t: next(r["metric"] for r in rows if r["task"] == t) for t in tasks}
    head = "| method | delta params | % of backbone | " + " | ".join(
        f"{TASK_NAMES[t]} ({METRIC_NAMES.get(metric[t], metric[t])}) | s" for t in tasks) + " |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(tasks)))
    for m in order:
        any_r = next(by[(t, m)] for t in tasks if (t, m) in by)
        dp = any_r.get("delta_params") or any_r["trainable_params"]
        backbone = any_r["total_params"] - (any_r["trainable_params"] - dp) if any_r.get("delta_params") else None
        cells = []
        for t in tasks:
            r = by.get((t, m))
            cells += [f"{100 * r['score']:.1f}" if r else "—", f"{r['wall_seconds']:.0f}" if r else "—"]
        share = pct(dp, 22_713_216) if m != "full" else "99.35"
        print(f"| {m} | {dp:,} | {share} | " + " | ".join(cells) + " |")
    print()
    print("Commands (add `--data-dir ../shared/data`; `--task` as in the column):")
    print()
    print("```sh")
    for m in order:
        r = next(by[(t, m)] for t in tasks if (t, m) in by)
        print(r["command"])
    print("```")


def s3delta_table(path):
    rows = [r for r in load(path) if "error" not in r and "skipped" not in r]
    skipped = [r for r in load(path) if "skipped" in r]
    errors = [r for r in load(path) if "error" in r]
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rows)]
    budgets = []
    for r in rows:
        if r["budget"] != "-" and r["budget"] not in budgets:
            budgets.append(r["budget"])
    budgets.sort(key=lambda b: float(b.rstrip("%")))
    methods = ["s3-L", "s3-M", "random", "manual-lora", "manual-bitfit", "manual-lnfit", "manual-adapter"]
    cell = defaultdict(list)
    for r in rows:
        cell[(r["task"], r["budget"], r["method"])].append(100 * r["score"])

    def fmt(v):
        if not v:
            return "—"
        m = statistics.mean(v)
        if len(v) == 1:
            return f"{m:.1f} (1 seed)"
        s = statistics.stdev(v)
        return f"{m:.1f} ± {s:.1f}" + ("" if len(v) == 3 else f" ({len(v)})")

    for t in tasks:
        metric = next(r["metric"] for r in rows if r["task"] == t)
        print(f"**{TASK_NAMES[t]}** ({METRIC_NAMES.get(metric, metric)} ×100, mean ± sd over seeds)")
        print()
        print("| method | " + " | ".join(budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for m in methods + [m for m in SECOND_ORDER if any(cell[(t, b, m)] for b in budgets)]:
            print(f"| {m} | " + " | ".join(fmt(cell[(t, b, m)]) for b in budgets) + " |")
        full = cell[(t, "-", "full")]
        print(f"| full fine-tuning | {fmt(full)} (all budgets) |" + " |" * (len(budgets) - 1))
        print()

    # The claim: searched beats random and manual at equal budget, the margin growing as the budget shrinks.
    print("**Margin of the better S3Delta space over the best baseline** (points, mean over tasks; "
          "per-task wins in brackets)")
    print()
    print("| budget | best S3Delta − best manual | best S3Delta − random | S3Delta wins vs manual | vs random |")
    print("|---|---|---|---|---|")
    for b in budgets:
        dm, dr, wm, wr, n = [], [], 0, 0, 0
        for t in tasks:
            s3 = [statistics.mean(cell[(t, b, m)]) for m in ("s3-L", "s3-M") if cell[(t, b, m)]]
            man = [statistics.mean(cell[(t, b, m)]) for m in methods[3:] if cell[(t, b, m)]]
            rnd = cell[(t, b, "random")]
            if not s3:
                continue
            n += 1
            if man:
                dm.append(max(s3) - max(man))
                wm += max(s3) > max(man)
            if rnd:
                dr.append(max(s3) - statistics.mean(rnd))
                wr += max(s3) > statistics.mean(rnd)
        f = lambda v: f"{statistics.mean(v):+.1f}" if v else "—"
        print(f"| {b} | {f(dm)} | {f(dr)} | {wm}/{len(dm)} | {wr}/{len(dr)} |")
    print()
    # Searches marked "timing": "paused" were stopped for a while by the operator: their wall
    # time is not a measurement.
    timed = [r for r in rows if r.get("timing") != "paused"]
    for label, ms in (("", ("s3-L", "s3-M")), ("second-order ", SECOND_ORDER)):
        ratios = [r["search_over_retrain"] for r in timed if r["method"] in ms and r.get("search_over_retrain")]
        secs = [r["search_seconds"] for r in timed if r["method"] in ms and r.get("search_seconds")]
        if ratios:
            print(f"{label.capitalize() or 'Search '}{'search ' if label else ''}wall time: median {statistics.median(secs):.0f} s, "
                  f"{statistics.median(ratios):.2f}× one retraining run (median over {len(ratios)} searches; "
                  f"range {min(ratios):.2f}–{max(ratios):.2f}).")
    second_order_table(tasks, budgets, {(r["task"], r["budget"], r["method"], r["seed"]): 100 * r["score"] for r in rows})
    if skipped:
        kinds = sorted({(r['method'], r['budget']) for r in skipped})
        print(f"Not run (the placement does not fit the budget): " + ", ".join(f"{m} at {b}" for m, b in kinds) + ".")
    if errors:
        print(f"{len(errors)} runs failed; see the results file.")


def second_order_table(tasks, budgets, score):
    """Second-order (unrolled) search against the default first-order one: same task, budget, space
    and seed, paired."""
    def paired(t, b, sp):
        seeds = sorted(s for (t2, b2, m, s) in score if (t2, b2, m) == (t, b, f"s3-{sp}-2nd") and (t, b, f"s3-{sp}", s) in score)
        return [score[(t, b, f"s3-{sp}-2nd", s)] - score[(t, b, f"s3-{sp}", s)] for s in seeds]

    if not any(paired(t, b, sp) for t in tasks for b in budgets for sp in ("L", "M")):
        return
    print()
    print("**Second-order − first-order search** (points, mean over seeds of the paired difference; same retraining)")
    print()
    print("| task | space | " + " | ".join(budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for t in tasks:
        for sp in ("L", "M"):
            diffs = [paired(t, b, sp) for b in budgets]
            if not any(diffs):
                continue
            cells = [(f"{statistics.mean(d):+.1f}" + ("" if len(d) == 3 else f" ({len(d)})")) if d else "—" for d in diffs]
            print(f"| {TASK_NAMES[t]} | {sp} | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "s3delta"
    default = f"experiments/results/{what}.jsonl"
    path = sys.argv[2] if len(sys.argv) > 2 else default
    {"methods": methods_table, "s3delta": s3delta_table}[what](path)
