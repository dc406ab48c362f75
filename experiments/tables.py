#!/usr/bin/env python3
"""Markdown tables for the README from the experiment results files.

  python3 experiments/tables.py methods [experiments/results/methods.jsonl]
  python3 experiments/tables.py s3delta [experiments/results/s3delta.jsonl]
  python3 experiments/tables.py s3delta --update docs/search.md   # rewrite the tables of docs/search.md in place
  python3 experiments/tables.py learnable [experiments/results/s3delta_learnable.jsonl] [--update docs/experiments.md]
  python3 experiments/tables.py generative [experiments/results/s3delta_generative.jsonl] [--update docs/experiments.md]
  python3 experiments/tables.py combos [experiments/results/combos.jsonl] [--update docs/experiments.md]
  python3 experiments/tables.py summary --update README.md   # the README's front-page table (both grids)
      [--figure docs/images/combos_convergence --bin target/release/deltatune]

Scores are printed ×100 (accuracy, Matthews correlation, Pearson). S3Delta cells are the mean and
sample standard deviation over seeds, with the number of seeds when it is not 3.
"""
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

TASK_NAMES = {"sst2": "SST-2", "rte": "RTE", "cola": "CoLA", "stsb": "STS-B", "mrpc": "MRPC", "trec": "TREC", "mr": "MR",
              "subj": "SUBJ", "cr": "CR", "mpqa": "MPQA", "sst5": "SST-5"}
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


def mean_sd(v):
    m = statistics.mean(v)
    return m, (statistics.stdev(v) if len(v) > 1 else float("nan"))


def fmt_cell(v):
    if not v:
        return "—"
    m, sd = mean_sd(v)
    if len(v) == 1:
        return f"{m:.1f} (1 seed)"
    return f"{m:.1f} ± {sd:.1f}" + ("" if len(v) == 3 else f" ({len(v)})")


def diff(a, b):
    """Mean of `a` minus mean of `b` (points), and in brackets that difference over its standard
    error sqrt(sd_a²/n_a + sd_b²/n_b) when both have several seeds."""
    if not a or not b:
        return "—"
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    se = ((sa ** 2 / len(a) if len(a) > 1 else 0) + (sb ** 2 / len(b) if len(b) > 1 else 0)) ** 0.5
    return f"{ma - mb:+.1f}" + (f" ({(ma - mb) / se:+.1f})" if se > 0 else "")


LEARNABLE_METHODS = ["s3-L", "random", "manual-lora", "manual-bitfit", "adalora"]
MANUAL_LIKE = ["manual-lora", "manual-bitfit", "adalora"]


def learnable_table(path, protocol="learnable-3000x3"):
    """The learnable protocol: references (is each task learnable?), each task's budget table, the
    margins of the searched structure with their seed-to-seed spread, the share of full
    fine-tuning kept, and transferred structures."""
    everything = load(path)
    protocols = sorted({r.get("protocol", "-") for r in everything})
    rows = [r for r in everything if r.get("protocol") == protocol and "error" not in r and "skipped" not in r]
    if not rows:
        sys.exit(f"{path}: no finished runs of protocol {protocol} (there: {', '.join(protocols)})")
    r0 = rows[0]
    print(f"Protocol `{protocol}`: first {r0['train_examples']} training examples, first {r0['dev_examples']} dev "
          f"examples, max length {r0.get('max_length', 64)}, batch 32, {r0['epochs']} epochs, best dev epoch; "
          f"search {r0['search_epochs']} epochs (first-order) on the same examples split 50/50.")
    print()
    # Tasks with budget runs get tables; the others appear in the learnability table only.
    tasks = [t for t in TASK_NAMES if any(r["task"] == t and r["budget"] != "-" for r in rows)]
    score = defaultdict(list)
    secs = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["seed"]):
        score[(r["task"], r["budget"], r["method"])].append(100 * r["score"])
        secs[r["method"] if not r["method"].startswith("xfer-") else "transferred"].append(
            r.get("wall_seconds", 0) + r.get("search_seconds", 0))
    metric = {t: next(r["metric"] for r in rows if r["task"] == t) for t in tasks}
    # Every other protocol's references too: the learnability check of tasks left out.
    print("**Is each task learnable?** Full fine-tuning and LoRA r=8 on query,value (seed 1 unless said), "
          "the majority-class score for comparison")
    print()
    print("| task | protocol | metric | full fine-tuning | LoRA r=8 | majority class |")
    print("|---|---|---|---|---|---|")
    refs = defaultdict(list)
    for r in everything:
        if r.get("method") in ("full", "lora8") and "score" in r:
            refs[(r["task"], r.get("protocol", "-"), r["method"])].append(100 * r["score"])
    seen = sorted({(t, p) for (t, p, _) in refs}, key=lambda x: (list(TASK_NAMES).index(x[0]), x[1]))
    floor = {"accuracy": None, "matthews": 0.0, "pearson": 0.0}
    for t, p in seen:
        m = next(r["metric"] for r in everything if r["task"] == t and "metric" in r)
        base = MAJORITY.get(t)
        print(f"| {TASK_NAMES[t]} | {p} | {METRIC_NAMES.get(m, m)} | {fmt_cell(refs[(t, p, 'full')])} | "
              f"{fmt_cell(refs[(t, p, 'lora8')])} | {base if base is not None else floor.get(m, '—')} |")
    print()
    budgets = sorted({r["budget"] for r in rows if r["budget"] != "-"}, key=lambda b: float(b.rstrip("%")))
    xfers = sorted({r["method"] for r in rows if r["method"].startswith("xfer-")})
    for t in tasks:
        print(f"**{TASK_NAMES[t]}** ({METRIC_NAMES.get(metric[t], metric[t])} ×100, mean ± sd over seeds)")
        print()
        print("| method | " + " | ".join(budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for m in LEARNABLE_METHODS + [x for x in xfers if x.split("-")[1] != t]:
            label = f"{m.split('-', 2)[2]} searched on {TASK_NAMES[m.split('-')[1]]}" if m.startswith("xfer-") else m
            print(f"| {label} | " + " | ".join(fmt_cell(score[(t, b, m)]) for b in budgets) + " |")
        for ref, label in (("full", "full fine-tuning"), ("lora8", "LoRA r=8 (73,728 params)")):
            if score[(t, "-", ref)]:
                print(f"| {label} | {fmt_cell(score[(t, '-', ref)])} (no budget) |" + " |" * (len(budgets) - 1))
        print()
    # Margins with their spread.
    print("**Margin of the searched structure (s3-L)** in points: mean difference of the seed means, and in "
          "brackets that difference over its standard error (sqrt(sd1²/n1 + sd2²/n2)); |ratio| < 2 is inside the "
          "seed-to-seed noise. \"kept\" is s3-L's mean over full fine-tuning's.")
    print()
    print("| task | budget | s3-L | best manual (which) | s3-L − best manual | s3-L − random | kept of full |")
    print("|---|---|---|---|---|---|---|")

    for t in tasks:
        full = score[(t, "-", "full")]
        for b in budgets:
            s3 = score[(t, b, "s3-L")]
            man = {m: score[(t, b, m)] for m in MANUAL_LIKE if score[(t, b, m)]}
            best = max(man, key=lambda m: statistics.mean(man[m])) if man else None
            kept = f"{100 * statistics.mean(s3) / statistics.mean(full):.0f}%" if s3 and full else "—"
            print(f"| {TASK_NAMES[t]} | {b} | {fmt_cell(s3)} | {fmt_cell(man[best]) + f' ({best})' if best else '—'} | "
                  f"{diff(s3, man[best]) if best else '—'} | {diff(s3, score[(t, b, 'random')])} | {kept} |")
    print()
    if xfers:
        print("**Transfer**: the structure searched on the other task (same budget and seed), retrained here, "
              "against the task's own search and against its manual placement (LoRA on query,value), in points "
              "(ratio to the standard error in brackets)")
        print()
        print("| task | structure from | against | " + " | ".join(budgets) + " |")
        print("|---|---|---|" + "---|" * len(budgets))
        for t in tasks:
            for x in xfers:
                src = x.split("-")[1]
                if src == t:
                    continue
                for base, label in (("s3-L", "own search"), ("manual-lora", "manual-lora")):
                    print(f"| {TASK_NAMES[t]} | {TASK_NAMES[src]} | {label} | "
                          + " | ".join(diff(score[(t, b, x)], score[(t, b, base)]) for b in budgets) + " |")
        print()
    search_settings_table(rows, tasks, budgets)
    print("Wall time per run (median, seconds, one thread; searches include their retraining): " + ", ".join(
        f"{m} {statistics.median(v):.0f}" for m, v in sorted(secs.items()) if v) + f"; {len(rows)} runs, "
        f"{sum(sum(v) for v in secs.values()) / 3600:.1f} CPU-hours in all.")
    skipped = sorted({(r["method"], r["budget"]) for r in everything if r.get("protocol") == protocol and "skipped" in r})
    if skipped:
        print()
        print("Not run (the placement does not fit the budget): " + ", ".join(f"{m} at {b}" for m, b in skipped) + ".")


SEARCH_VARIANTS = [("s3-L", "first-order, 3 epochs (default)"), ("s3-L-2nd", "second-order (DARTS), 3 epochs"),
                   ("s3-L-e10", "first-order, 10 epochs")]


def search_settings_table(rows, tasks, budgets):
    """Which search settings to default to: each variant's retrained score, its paired per-seed
    difference from the default search (same task, budget, seed and retraining), and its search time."""
    by = {(r["task"], r["budget"], r["method"], r["seed"]): r for r in rows}
    cells = sorted({(t, b) for (t, b, m, _) in by if m in ("s3-L-2nd", "s3-L-e10")},
                   key=lambda tb: (list(TASK_NAMES).index(tb[0]), float(tb[1].rstrip("%"))))
    if not cells:
        return
    print("**Search settings** (retrained score ×100, mean ± sd over seeds; the difference from the default "
          "search is paired by seed, in points, with its ratio to the standard error of the paired differences "
          "in brackets; search time is the median over seeds, one thread, without the retraining)")
    print()
    print("| task | budget | search | score | − default (paired) | selected params | search s |")
    print("|---|---|---|---|---|---|---|")
    for t, b in cells:
        base = {s: r for (t2, b2, m, s), r in by.items() if (t2, b2, m) == (t, b, "s3-L")}
        for m, label in SEARCH_VARIANTS:
            runs = {s: r for (t2, b2, m2, s), r in by.items() if (t2, b2, m2) == (t, b, m)}
            if not runs:
                continue
            sc = [100 * runs[s]["score"] for s in sorted(runs)]
            d = [100 * (runs[s]["score"] - base[s]["score"]) for s in sorted(runs) if s in base]
            if m == "s3-L" or not d:
                dcell = "—"
            else:
                md = statistics.mean(d)
                se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
                dcell = f"{md:+.1f}" + (f" ({md / se:+.1f})" if se > 0 else "") + ("" if len(d) == 3 else f" [{len(d)} seeds]")
            params = statistics.median(r["delta_params"] for r in runs.values() if "delta_params" in r)
            secs = statistics.median(r.get("search_seconds", 0) for r in runs.values())
            print(f"| {TASK_NAMES[t]} | {b} | {label} | {fmt_cell(sc)} | {dcell} | {params:,.0f} | {secs:.0f} |")
    print()


# The score of always answering the majority class on the dev examples the protocols read (the
# first 1000 of each dev split; counted from the files of ../shared/data): accuracy for SST-2
# (444 of 872) and RTE (146 of 277); for TREC, whose dev split is a seeded tenth of TREC.train,
# the largest class's share of TREC.train (ENTY, 1,250 of 5,452); F1 for MRPC (answering
# "paraphrase" on the first 1000 test pairs); Matthews and Pearson are 0 for a constant answer.
MAJORITY = {"sst2": 50.9, "trec": 22.9, "rte": 52.7, "mrpc": 81.0, "cola": 0.0, "stsb": 0.0}


def combos_table(path, figure=None, binary="target/release/deltatune"):
    """Combinations of methods: final score, parameters, and how fast each converges (the first
    step where the dev score reaches 95% of the way from its first evaluation to its best); with
    --figure, the dev curves of every combination as PNG and SVG."""
    rows = [r for r in load(path) if "error" not in r]
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rows)]
    for t in tasks:
        rs = [r for r in rows if r["task"] == t]
        metric = rs[0]["metric"]
        by = defaultdict(list)
        for r in rs:
            by[(r["combo"], r["lr"])].append(r)
        r0 = rs[0]
        print(f"**{TASK_NAMES[t]}**: {len(by)} combinations at lr {', '.join(sorted({r['lr'] for r in rs}))}, "
              f"{r0['train_examples']} training examples, {r0['epochs']} epochs, dev every {r0['eval_every']} steps "
              f"({METRIC_NAMES.get(metric, metric)} ×100)")
        print()
        print("| methods | delta params | best dev | final dev | steps to 95% of best | s |")
        print("|---|---|---|---|---|---|")
        for (combo, lr), group in sorted(by.items(), key=lambda kv: (len(kv[0][0].split("+")), kv[0][0])):
            best = [100 * r["score"] for r in group]
            final = [100 * r["curve"][-1][1] for r in group if r.get("curve")]
            reach = []
            for r in group:
                c = r.get("curve") or []
                if c:
                    lo, hi = c[0][1], max(y for _, y in c)
                    reach.append(next(x for x, y in c if y >= lo + 0.95 * (hi - lo)))
            print(f"| {combo.replace('+', ' + ')} | {group[0]['delta_params']:,} | {fmt_cell(best)} | {fmt_cell(final)} | "
                  f"{statistics.median(reach):.0f} | {statistics.median(r['wall_seconds'] for r in group):.0f} |")
        print()
        if figure:
            # One panel per number of methods combined (singles, pairs, three or more), so that
            # every panel stays readable.
            panels = []
            seed = min(r["seed"] for r in rs)
            for label, sizes in (("one method", (1,)), ("two methods", (2,)), ("three and four methods", (3, 4))):
                series = []
                for (combo, lr), group in sorted(by.items(), key=lambda kv: kv[0][0]):
                    if len(combo.split("+")) in sizes:
                        r = min(group, key=lambda r: r["seed"])
                        series.append({"name": combo.replace("+", " + "), "points": [[x, 100 * y] for x, y in r["curve"]]})
                if series:
                    panels.append({"title": f"{TASK_NAMES[t]}, {label}: dev {METRIC_NAMES.get(metric, metric)} against steps (seed {seed})",
                                   "x_label": "optimizer step", "y_label": f"dev {METRIC_NAMES.get(metric, metric)} ×100",
                                   "series": series})
            draw(figure if len(tasks) == 1 else f"{figure}_{t}", panels, binary)
            print(f"Figure: `{figure}.png` / `.svg` (`python3 experiments/tables.py combos --figure {figure}`).")
            print()


def generative_table(path):
    """The decoder protocol, per model: per task, the untuned model and LoRA r=8, then S3Delta,
    random and manual placements at each budget (share of that decoder), with the margins over
    their spread."""
    everything = load(path)
    rows = [r for r in everything if "error" not in r and "skipped" not in r and r.get("score") is not None]
    if not rows:
        sys.exit(f"{path}: no finished runs")
    models = []
    for r in rows:
        if r["model"] not in models:
            models.append(r["model"])
    for model in models:
        generative_model_table([r for r in rows if r["model"] == model])


def generative_model_table(rows):
    r0 = rows[0]
    print(f"**{r0['model']}** (frozen quantized base); first {r0['train_examples']} training examples, first "
          f"{r0['dev_examples']} dev examples, max length {r0['max_length']}, batch 8, {r0['epochs']} epoch(s) of "
          f"retraining, {r0['search_epochs']} search epoch(s); accuracy by the label words' log-probability.")
    print()
    score = defaultdict(list)
    secs = defaultdict(list)
    cpu_seconds = []
    budget_params = {}
    lora8_params = None
    for r in sorted(rows, key=lambda r: r["seed"]):
        score[(r["task"], r["budget"], r["method"])].append(100 * r["score"])
        secs[r["method"]].append(r.get("wall_seconds", 0) + r.get("search_seconds", 0))
        cpu_seconds.append(r.get("threads", 2) * (r.get("wall_seconds", 0) + r.get("search_seconds", 0)))
        if r["budget"] != "-":
            budget_params[r["budget"]] = r["budget_params"]
        if r["method"] == "lora8":
            lora8_params = r.get("delta_params")
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rows)]
    budgets = sorted(budget_params, key=lambda b: float(b.rstrip("%")))
    print("| task | method | " + " | ".join(f"{b} ({budget_params[b]:,} params)" for b in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    lora8 = f"LoRA r=8 q,v ({lora8_params:,} params)" if lora8_params else "LoRA r=8 q,v"
    for t in tasks:
        for m in ("s3-L", "random", "manual-lora"):
            print(f"| {TASK_NAMES[t]} | {m} | " + " | ".join(fmt_cell(score[(t, b, m)]) for b in budgets) + " |")
        print(f"| {TASK_NAMES[t]} | untuned model | {fmt_cell(score[(t, '-', 'untuned')])} (no training) |" + " |" * (len(budgets) - 1))
        print(f"| {TASK_NAMES[t]} | {lora8} | {fmt_cell(score[(t, '-', 'lora8')])} (no budget) |" + " |" * (len(budgets) - 1))
    print()

    print("Margins (points; in brackets over the standard error): ")
    print()
    print("| task | budget | s3-L − manual-lora | s3-L − random | s3-L − untuned | kept of LoRA r=8's gain |")
    print("|---|---|---|---|---|---|")
    for t in tasks:
        u, l8 = score[(t, "-", "untuned")], score[(t, "-", "lora8")]
        for b in budgets:
            s3 = score[(t, b, "s3-L")]
            kept = "—"
            if s3 and u and l8 and statistics.mean(l8) != statistics.mean(u):
                kept = f"{100 * (statistics.mean(s3) - statistics.mean(u)) / (statistics.mean(l8) - statistics.mean(u)):.0f}%"
            print(f"| {TASK_NAMES[t]} | {b} | {diff(s3, score[(t, b, 'manual-lora')])} | {diff(s3, score[(t, b, 'random')])} | "
                  f"{diff(s3, u)} | {kept} |")
    print()
    threads = sorted({r.get("threads", 2) for r in rows})
    print(f"Wall time per run (median, seconds, {' or '.join(map(str, threads))} thread(s) per run; the search row "
          "includes its retraining): " + ", ".join(
        f"{m} {statistics.median(v):.0f}" for m, v in sorted(secs.items()) if v) + f"; {len(rows)} runs, "
        f"{sum(cpu_seconds) / 3600:.1f} CPU-hours in all (wall time × threads).")
    print()


def summary_table(learnable_path, generative_path, protocol="learnable-3000x3"):
    """The README's front-page table: the searched structure's margins over the best manual
    placement and over random structures, per task and budget, on the encoder (learnable protocol,
    with the share of full fine-tuning kept) and on the decoder (text-to-text)."""
    def scores(rows):
        score = defaultdict(list)
        for r in sorted(rows, key=lambda r: r["seed"]):
            score[(r["task"], r["budget"], r["method"])].append(100 * r["score"])
        return score

    def margin(a, b):
        return f"{statistics.mean(a) - statistics.mean(b):+.1f}".replace("-", "−") if a and b else "—"

    def seeds(v):
        return str(len(v)) if v else "0"

    enc = [r for r in load(learnable_path) if r.get("protocol") == protocol and r.get("score") is not None
           and "error" not in r and "skipped" not in r]
    dec = [r for r in load(generative_path) if r.get("score") is not None and "error" not in r and "skipped" not in r]
    models = []
    for r in dec:
        if r["model"] not in models:
            models.append(r["model"])
    grids = [("encoder (MiniLM-L6, 22.7 M)", enc, MANUAL_LIKE, "full")] + [
        (f"decoder ({m}, text-to-text)", [r for r in dec if r["model"] == m], ["manual-lora"], "lora8") for m in models]
    for label, rows, manual, kept_ref in grids:
        if not rows:
            continue
        score = scores(rows)
        tasks = [t for t in TASK_NAMES if any(r["task"] == t and r["budget"] != "-" for r in rows)]
        # TREC first: the task where the search's effect is largest reads first.
        tasks.sort(key=lambda t: t != "trec")
        budgets = sorted({r["budget"] for r in rows if r["budget"] != "-"}, key=lambda b: float(b.rstrip("%")))
        head = " | ".join(f"{TASK_NAMES[t]} {' / '.join(budgets)}" for t in tasks)
        print(f"| {label}: searched structure against | {head} |")
        print("|---|" + "---|" * len(tasks))
        lines = {"the best manual placement": [], "random structures": [],
                 ("share of full fine-tuning kept" if kept_ref == "full" else "share of LoRA r=8's gain over the untuned model kept"): [],
                 "seeds": []}
        for t in tasks:
            cells = {k: [] for k in lines}
            for b in budgets:
                s3 = score[(t, b, "s3-L")]
                man = {m: score[(t, b, m)] for m in manual if score[(t, b, m)]}
                best = max(man, key=lambda m: statistics.mean(man[m])) if man else None
                cells["the best manual placement"].append(margin(s3, man[best]) if best else "—")
                cells["random structures"].append(margin(s3, score[(t, b, "random")]))
                ref = score[(t, "-", kept_ref)]
                k = [k for k in lines if k.startswith("share")][0]
                if kept_ref == "full":
                    cells[k].append(f"{100 * statistics.mean(s3) / statistics.mean(ref):.0f}%" if s3 and ref else "—")
                else:
                    u = score[(t, "-", "untuned")]
                    gain = statistics.mean(ref) - statistics.mean(u) if ref and u else 0
                    cells[k].append(f"{100 * (statistics.mean(s3) - statistics.mean(u)) / gain:.0f}%" if s3 and gain else "—")
                cells["seeds"].append(seeds(s3))
            for k in lines:
                lines[k].append(" / ".join(cells[k]))
        for k, v in lines.items():
            print(f"| {k} | " + " | ".join(v) + " |")
        print()


def draw(out, panels, binary):
    """Renders curves through `deltatune plot --series` (plotters, PNG and SVG)."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"panels": panels, "width": 1100}, f)
    try:
        p = subprocess.run([binary, "plot", "--series", f.name, "--out", str(out), "--overwrite"], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"plot failed: {p.stderr.strip()}")
    finally:
        os.unlink(f.name)


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
    figure, binary = None, "target/release/deltatune"
    for flag in ("--figure", "--bin"):
        if flag in args:
            i = args.index(flag)
            if i + 1 >= len(args):
                sys.exit(f"{flag} needs a value")
            if flag == "--figure":
                figure = args[i + 1]
            else:
                binary = args[i + 1]
            del args[i:i + 2]
    what = args[0] if args else "s3delta"
    default = {"learnable": "experiments/results/s3delta_learnable.jsonl",
               "generative": "experiments/results/s3delta_generative.jsonl"}.get(what, f"experiments/results/{what}.jsonl")
    path = args[1] if len(args) > 1 else default
    if what == "summary":
        path = "experiments/results/s3delta_learnable.jsonl"
    renders = {"summary": lambda: summary_table("experiments/results/s3delta_learnable.jsonl",
                                                "experiments/results/s3delta_generative.jsonl"),
               "methods": lambda: methods_table(path), "s3delta": lambda: s3delta_table(path),
               "learnable": lambda: learnable_table(path), "combos": lambda: combos_table(path, figure, binary),
               "generative": lambda: generative_table(path)}
    if what not in renders:
        sys.exit(f"unknown table {what!r}: one of {', '.join(renders)}")
    render = renders[what]
    if readme:
        update(readme, what, render)
    else:
        render()
