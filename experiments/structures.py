#!/usr/bin/env python3
"""How consistent are the searched structures? Reads the work directory of `experiments/s3delta.py`
(its search outputs and random-structure configs) and prints, per space and budget, the mean
pairwise Jaccard overlap of the chosen candidate sets:

  * across seeds, same task  — does the search find the same structure again?
  * across tasks, same seed  — is the structure task-specific?
  * random structures across seeds (space M) — the overlap that chance alone gives;

how far the search moved the gates: the mean over searches of max α − min α (every α starts
at 0) and of max p / median p (how strongly the top candidate stands out); and, for search
variants (longer, second-order), how often they choose the default search's structure.

  python3 experiments/structures.py [--work runs/s3delta]
"""
import argparse
import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path

BUDGETS = ["0.0035", "0.0139", "0.05", "0.1"]


def jaccard(a, b):
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_pairwise(sets):
    pairs = [jaccard(a, b) for a, b in itertools.combinations(sets, 2)]
    return (statistics.mean(pairs), len(pairs)) if pairs else (None, 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/s3delta")
    a = ap.parse_args()
    work = Path(a.work)
    chosen = {}  # (task, budget, method, seed) -> frozenset of (method, path)
    spread = defaultdict(list)  # (budget, method) -> (max α − min α, max p / median p)
    for d in sorted(work.glob("*-search")):
        task, budget, rest = d.name.split("-", 2)
        method, seed_tag, _ = rest.rsplit("-", 2)  # s3-L-e10, s1, search
        seed = int(seed_tag[1:])
        f = d / "candidates.json"
        if not f.exists():
            continue
        cands = json.loads(f.read_text())
        chosen[(task, budget, method, seed)] = frozenset((c["method"], c["path"]) for c in cands if c["selected"])
        alphas, ps = [c["alpha"] for c in cands], [c["p"] for c in cands]
        spread[(budget, method)].append((max(alphas) - min(alphas), max(ps) / statistics.median(ps)))
    for f in sorted(work.glob("*-random-s*.json")):
        task, budget, rest = f.stem.split("-", 2)
        seed = int(rest.rsplit("-s", 1)[1])
        specs = json.loads(f.read_text())["deltas"]
        chosen[(task, budget, "random", seed)] = frozenset((s["method"], p) for s in specs for p in s["target_modules"])
    if not chosen:
        raise SystemExit(f"{work}: no search outputs (*-search/candidates.json) or random structures; "
                         "pass the --work directory of experiments/s3delta.py")
    methods = sorted({k[2] for k in chosen}, key=lambda m: (m == "random", m))
    tasks = sorted({k[0] for k in chosen})
    seeds = sorted({k[3] for k in chosen})
    print("| structures | budget | Jaccard across seeds (same task) | across tasks (same seed) | α range | max p / median p |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        for b in BUDGETS:
            by_task = [mean_pairwise([chosen[(t, b, m, s)] for s in seeds if (t, b, m, s) in chosen]) for t in tasks]
            by_seed = [mean_pairwise([chosen[(t, b, m, s)] for t in tasks if (t, b, m, s) in chosen]) for s in seeds]
            seeds_j = [v for v, n in by_task if n]
            # A random structure depends on the seed only, so it is the same for every task.
            tasks_j = [v for v, n in by_seed if n] if m != "random" else []
            if not seeds_j and not tasks_j:
                continue
            f = lambda v: f"{statistics.mean(v):.2f}" if v else "—"
            sp = spread.get((b, m), [])
            print(f"| {m} | {b}% | {f(seeds_j)} | {f(tasks_j)} | {f([x for x, _ in sp])} | {f([y for _, y in sp])} |")
    # Search variants (s3-L-e10, s3-M-2nd, ...) against the default search, same task, budget, seed.
    variants = [m for m in methods if m.startswith("s3-") and m.count("-") > 1]
    if variants:
        print()
        print("| variant | budget | Jaccard with the default search (same task and seed) | identical structures |")
        print("|---|---|---|---|")
        for v in variants:
            base = "-".join(v.split("-")[:2])
            for b in BUDGETS:
                pairs = [(chosen[k], chosen[(k[0], b, base, k[3])]) for k in chosen
                         if k[1] == b and k[2] == v and (k[0], b, base, k[3]) in chosen]
                if pairs:
                    same = sum(x == y for x, y in pairs)
                    print(f"| {v} | {b}% | {statistics.mean(jaccard(x, y) for x, y in pairs):.2f} | {same}/{len(pairs)} |")


if __name__ == "__main__":
    main()
