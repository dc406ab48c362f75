#!/usr/bin/env python3
"""Markdown tables for the README from the experiment results files.

  python3 experiments/tables.py methods [experiments/results/methods.jsonl]
  python3 experiments/tables.py s3delta [experiments/results/s3delta.jsonl]
  python3 experiments/tables.py s3delta --update docs/search.md   # rewrite the tables of docs/search.md in place

Scores are printed ×100 (accuracy, Matthews correlation, Pearson). S3Delta cells are the mean and
sample standard deviation over seeds, with the number of seeds when it is not 3.
"""
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

TASK_NAMES = {"sst2": "SST-2", "rte": "RTE", "cola": "CoLA", "stsb": "STS-B", "mrpc": "MRPC"}
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
    everything = load(path)
    rows = [r for r in everything if "error" not in r and "skipped" not in r]
    skipped = [r for r in everything if "skipped" in r]
    errors = [r for r in everything if "error" in r]
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rows)]
    budgets = []
    for r in rows:
        if r["budget"] != "-" and r["budget"] not in budgets:
            budgets.append(r["budget"])
    budgets.sort(key=lambda b: float(b.rstrip("%")))
    methods = ["s3-L", "s3-M", "random", "manual-lora", "manual-bitfit", "manual-lnfit", "manual-adapter"]
    # Search variants (s3-L-2nd, s3-M-e10, ...): extra rows, and a paired comparison with their base.
    variants = sorted({r["method"] for r in rows if r["method"].startswith("s3-") and r["method"] not in methods[:2]})
    # One score per (task, budget, method, seed); `cell` lists them over seeds, in seed order.
    score = {(r["task"], r["budget"], r["method"], r["seed"]): 100 * r["score"] for r in rows}
    cell = defaultdict(list)
    for (t, b, m, _), v in sorted(score.items(), key=lambda kv: kv[0][3]):
        cell[(t, b, m)].append(v)

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
        for m in methods + [m for m in variants if any(cell[(t, b, m)] for b in budgets)]:
            print(f"| {m} | " + " | ".join(fmt(cell[(t, b, m)]) for b in budgets) + " |")
        full = cell[(t, "-", "full")]
        print(f"| full fine-tuning | {fmt(full)} (all budgets) |" + " |" * (len(budgets) - 1))
        print()

    # The claim: searched beats random and manual at equal budget, the margin growing as the budget shrinks.
    print("**Margin of S3Delta over the best baseline** (points; each cell the mean over tasks of the "
          "per-task difference of 3-seed means; wins = tasks where S3Delta's mean is higher)")
    print()
    print("| budget | s3-L − best manual | s3-M − best manual | better S3Delta − best manual | better S3Delta − random "
          "| wins vs manual | wins vs random |")
    print("|---|---|---|---|---|---|---|")
    for b in budgets:
        d = defaultdict(list)
        wm = wr = 0
        for t in tasks:
            mean = {m: statistics.mean(cell[(t, b, m)]) for m in methods if cell[(t, b, m)]}
            s3 = [mean[m] for m in ("s3-L", "s3-M") if m in mean]
            man = [mean[m] for m in methods[3:] if m in mean]
            if not s3 or not man:
                continue
            for m in ("s3-L", "s3-M"):
                if m in mean:
                    d[m].append(mean[m] - max(man))
            d["best"].append(max(s3) - max(man))
            wm += max(s3) > max(man)
            if "random" in mean:
                d["random"].append(max(s3) - mean["random"])
                wr += max(s3) > mean["random"]
        f = lambda v: f"{statistics.mean(v):+.1f}" if v else "—"
        print(f"| {b} | {f(d['s3-L'])} | {f(d['s3-M'])} | {f(d['best'])} | {f(d['random'])} "
              f"| {wm}/{len(d['best'])} | {wr}/{len(d['random'])} |")
    print()
    # Searches marked "timing": "paused" were stopped for a while by the operator: their wall
    # time is not a measurement.
    timed = [r for r in rows if r.get("timing") != "paused"]
    for label, ms in [("the default search (s3-L, s3-M)", ("s3-L", "s3-M"))] + [(v, (v,)) for v in variants]:
        ratios = [r["search_over_retrain"] for r in timed if r["method"] in ms and r.get("search_over_retrain")]
        secs = [r["search_seconds"] for r in timed if r["method"] in ms and r.get("search_seconds")]
        if ratios:
            print(f"Search wall time, {label}: median {statistics.median(secs):.0f} s, "
                  f"{statistics.median(ratios):.2f}× one retraining run (median over {len(ratios)} searches; "
                  f"range {min(ratios):.2f}–{max(ratios):.2f}).")
    variants_table(tasks, budgets, variants, score)
    if skipped:
        kinds = sorted({(r['method'], r['budget']) for r in skipped})
        print(f"Not run (the placement does not fit the budget): " + ", ".join(f"{m} at {b}" for m, b in kinds) + ".")
    if errors:
        print(f"{len(errors)} runs failed; see the results file.")


def variants_table(tasks, budgets, variants, score):
    """Each search variant against the default search of the same space: same task, budget and
    seed, paired, and the same retraining."""
    def paired(t, b, v):
        base = "-".join(v.split("-")[:2])
        seeds = sorted(s for (t2, b2, m, s) in score if (t2, b2, m) == (t, b, v) and (t, b, base, s) in score)
        return [score[(t, b, v, s)] - score[(t, b, base, s)] for s in seeds]

    rows = [(t, v, [paired(t, b, v) for b in budgets]) for t in tasks for v in variants]
    rows = [r for r in rows if any(r[2])]
    if not rows:
        return
    print()
    print("**Search variants − the default search of the same space** (points, mean of the per-seed differences)")
    print()
    print("| task | variant | " + " | ".join(budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for t, v, diffs in rows:
        cells = [(f"{statistics.mean(d):+.1f}" + ("" if len(d) == 3 else f" ({len(d)})")) if d else "—" for d in diffs]
        print(f"| {TASK_NAMES[t]} | {v} | " + " | ".join(cells) + " |")
    print()


def update(readme, what, render):
    """Replaces the text between `<!-- WHAT-tables:begin -->` and `<!-- WHAT-tables:end -->` in
    `readme` with the rendered tables."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        render()
    text = Path(readme).read_text()
    begin, end = f"<!-- {what}-tables:begin -->", f"<!-- {what}-tables:end -->"
    if begin not in text or end not in text:
        sys.exit(f"{readme}: markers {begin} … {end} not found")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    # Temp file, fsync, rename: an interrupted update leaves the README as it was.
    tmp = Path(str(readme) + ".tmp")
    with open(tmp, "w") as f:
        f.write(head + begin + "\n\n" + buf.getvalue().strip() + "\n\n" + end + tail)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(readme)


if __name__ == "__main__":
    args = sys.argv[1:]
    readme = None
    if "--update" in args:
        i = args.index("--update")
        if i + 1 >= len(args):
            sys.exit("--update needs the file to rewrite (e.g. --update docs/search.md)")
        readme = args[i + 1]
        del args[i:i + 2]
    what = args[0] if args else "s3delta"
    path = args[1] if len(args) > 1 else f"experiments/results/{what}.jsonl"
    render = lambda: {"methods": methods_table, "s3delta": s3delta_table}[what](path)
    if readme:
        update(readme, what, render)
    else:
        render()
