#!/usr/bin/env python3
"""S3Delta experiments: searched structures vs random and manual placements vs full fine-tuning,
at equal trainable-parameter budgets, on real GLUE data with the default model.

Every run goes through the `deltatune` binary (search, then retrain with `train --delta-config`)
and appends one JSON line to the results file; a finished (task, budget, method, seed) is skipped
when the script is restarted, so the grid can be run in pieces. `experiments/tables.py` turns the
results file into the README tables.

Protocol (identical for every method; CPU-sized): first --train examples of each task's training
split (file order, as the PEFT baseline does), the first --dev examples of its dev split, max length
64, batch 32,
--epochs epochs of retraining with AdamW (lr 1e-3 for deltas, 5e-5 for full fine-tuning, weight
decay 0.01, 6% warm-up then linear decay, clipping at 1.0), dev evaluation after every epoch and
the best epoch reported. The search uses the same training examples, split 50/50 into a weight
half and a gate half, for --search-epochs epochs (first-order alternation, weight lr 1e-3, α lr 0.1,
β = 1, τ = 1, renormalised p), and retrains the chosen structure from scratch. Methods s3-L-2nd and
s3-M-2nd (not in the default list) search with the DARTS second-order gate gradient instead
(`search --second-order`, what the reference's published runs used); a suffix -e<N> searches
for N epochs instead of --search-epochs (s3-L-e10, s3-M-2nd-e10).

Further methods: `full` and `lora8` (LoRA r=8 on query,value) are references without a budget;
`adalora` is AdaLoRA whose final rank budget spends the parameter budget (rank-4 start on the top
layers' query,value, pruned to the budget while training); `xfer-<task>-<search method>`
retrains the structure searched on another task at the same budget and seed (run the source
task's search first; a missing one is left for a later pass). `--protocol NAME` labels every
record, so protocols share a results file: `learnable-3000x3` (`--train 3000 --dev 1000 --epochs 3
--max-length 128`, docs/experiments.md) is where the tasks are learnable.

Usage:
  python3 experiments/s3delta.py --bin target/release/deltatune --data-dir ../shared/data \
      --out experiments/results/s3delta.jsonl [--tasks sst2,rte] [--budgets 0.0139%] [--seeds 1,2,3]
      [--methods s3-L-2nd,s3-M-2nd,s3-L-e10] [--shard I/N]

Spread over processes (experiments/grid.py): `--shard I/N` runs every N-th cell from the I-th; a
Slurm job array (scripts/slurm/grid-array.sbatch) or `mpirun -np N python3 experiments/s3delta.py`
sets the shard by itself. Shards append to the same results file.
"""
import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402

BACKBONE = 22_713_216
TASKS = ["sst2", "rte", "cola", "stsb", "mrpc"]
BUDGETS = ["0.0035%", "0.0139%", "0.05%", "0.1%"]
LAYERS = 6
HIDDEN = 384
INTER = 1536


def budget_params(b):
    return BACKBONE * float(b.rstrip("%")) / 100.0


def run(cmd, log):
    return grid.run_json(cmd, log)


# ------------------------------------------------------------------------------------------------
# Manual placements at a budget: the method on its usual positions, filled from the top layer down
# (the largest rank / all positions when the whole model fits).

def lora_qv(b):
    per = 2 * HIDDEN  # rank-1 LoRA on a 384x384 linear
    full_rank = int(b // (2 * LAYERS * per))
    if full_rank >= 1:
        return [{"method": "lora", "name": "lora", "r": full_rank, "lora_alpha": 16, "target_modules": ["query", "value"]}]
    layers = int(b // (2 * per))
    if layers == 0:
        return [{"method": "lora", "name": "lora", "r": 1, "lora_alpha": 16,
                 "target_modules": ["encoder.layer.5.attention.self.query"]}] if b >= per else None
    keep = list(range(LAYERS - layers, LAYERS))
    return [{"method": "lora", "name": "lora", "r": 1, "lora_alpha": 16, "target_modules": ["query", "value"],
             "layers_to_transform": keep}]


def bitfit(b):
    per_layer = 7 * HIDDEN + INTER  # q,k,v,o,out biases + 2 LN biases + intermediate bias
    layers = min(LAYERS, int(b // per_layer))
    if layers == 0:
        # Biases of the top layer's modules, smallest first, while they fit.
        mods = [("attention.output.LayerNorm", HIDDEN), ("output.LayerNorm", HIDDEN), ("attention.self.query", HIDDEN),
                ("attention.self.value", HIDDEN), ("attention.output.dense", HIDDEN), ("output.dense", HIDDEN)]
        used, tm = 0, []
        for m, n in mods:
            if used + n <= b:
                used += n
                tm.append(f"encoder.layer.5.{m}")
        return [{"method": "bitfit", "name": "bitfit", "target_modules": tm}] if tm else None
    return [{"method": "bitfit", "name": "bitfit", "target_modules": [f"encoder.layer.{l}" for l in range(LAYERS - layers, LAYERS)]}]


def lnfit(b):
    lns = ["embeddings.LayerNorm"] + [f"encoder.layer.{l}.{m}" for l in range(LAYERS) for m in ("attention.output.LayerNorm", "output.LayerNorm")]
    n = min(len(lns), int(b // HIDDEN))
    if n == 0:
        return None
    return [{"method": "ln_tuning", "name": "lnfit", "bias": False, "target_modules": lns[len(lns) - n:]}]


def adapter(b):
    per = 3 * HIDDEN + 3 * (HIDDEN // 32)  # the low-rank adapter of space M
    blocks = [f"encoder.layer.{l}.{m}" for l in range(LAYERS) for m in ("attention.output", "output")]
    n = min(len(blocks), int(b // per))
    if n == 0:
        return None
    return [{"method": "low_rank_adapter", "name": "adapter", "rank": 1, "reduction_factor": 32, "target_modules": blocks[len(blocks) - n:]}]


MANUAL = {"manual-lora": lora_qv, "manual-bitfit": bitfit, "manual-lnfit": lnfit, "manual-adapter": adapter}

# Budget-free references: full fine-tuning and LoRA r=8 on query,value (PEFT's usual setting).
REFERENCES = {"full": (["--delta", "full"], "5e-5"), "lora8": (["--delta", "lora:r=8,lora_alpha=16,target=query+value"], "1e-3")}


def adalora(b):
    """AdaLoRA whose final rank budget spends the parameter budget: a rank-1 triplet of a 384x384
    linear holds 2*384+1 parameters; `target_r` is the mean final rank per adapted matrix, so the
    matrices are the top layers' query,value (as many as the budget has ranks, at most all 12),
    each starting at rank 4 and pruned to the budget during training."""
    per = 2 * HIDDEN + 1
    ranks = int(b // per)
    if ranks == 0:
        return None
    mats = [(l, m) for l in range(LAYERS - 1, -1, -1) for m in ("query", "value")][:min(ranks, 2 * LAYERS)]
    target_r = ranks // len(mats)
    layers = sorted({l for l, _ in mats})
    if len(mats) % 2 == 1:  # an odd count: the last layer gets query only
        tm = [f"encoder.layer.{l}.attention.self.{m}" for l, m in mats]
        return [{"method": "adalora", "name": "adalora", "init_r": max(4, target_r + 2), "target_r": target_r,
                 "lora_alpha": 16, "target_modules": tm}]
    return [{"method": "adalora", "name": "adalora", "init_r": max(4, target_r + 2), "target_r": target_r,
             "lora_alpha": 16, "target_modules": ["query", "value"], "layers_to_transform": layers}]


def random_structure(cands, b, seed):
    """Random candidates of space M while they fit (the reference's random baseline)."""
    rng = random.Random(seed)
    order = list(range(len(cands)))
    rng.shuffle(order)
    used, chosen = 0, []
    for i in order:
        if used + cands[i]["params"] <= b:
            used += cands[i]["params"]
            chosen.append(cands[i])
    groups = {}
    for c in chosen:
        key = c["method"]
        spec = {"lora": {"method": "lora", "r": 1, "lora_alpha": 16}, "bitfit": {"method": "bitfit"},
                "ln_tuning": {"method": "ln_tuning", "bias": False},
                "low_rank_adapter": {"method": "low_rank_adapter", "rank": 1, "reduction_factor": 32}}[key]
        g = groups.setdefault(key, dict(spec, name=key, target_modules=[]))
        g["target_modules"].append(c["path"])
    return list(groups.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid.common_args(ap, "experiments/results/s3delta.jsonl", "runs/s3delta")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--methods", default="s3-L,s3-M,random," + ",".join(MANUAL) + ",full")
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--dev", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--search-epochs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--protocol", default=None, help="a label stored with every record (e.g. learnable-3000x5)")
    a = ap.parse_args()
    shard = grid.parse_shard(a.shard)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    log = work / "log.txt"
    work.mkdir(parents=True, exist_ok=True)
    done = grid.done_keys(out, lambda r: (r["task"], r["budget"], r["method"], r["seed"], r.get("protocol")))
    methods = a.methods.split(",")
    base = [a.bin, "--threads", str(a.threads)]
    data = ["--data-dir", a.data_dir, "--max-train", str(a.train), "--max-dev", str(a.dev), "--max-length", str(a.max_length)]
    common_train = ["--batch-size", "32", "--epochs", str(a.epochs), "--quiet", "--json", "--overwrite", "--checkpoint-every", "1000000"]
    cands_cache = {}
    cell = -1
    for task in a.tasks.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            for budget in a.budgets.split(","):
                b = budget_params(budget)
                for method in methods:
                    if method.startswith("xfer-") and method.split("-")[1] == task:
                        continue  # a task's own structure is its s3 row
                    ref = method in REFERENCES
                    key_budget = "-" if ref else budget
                    if ref and budget != a.budgets.split(",")[0]:
                        continue
                    # Cells are numbered whether done or not, so every shard agrees on the numbering.
                    cell += 1
                    if not grid.mine(cell, shard) or (task, key_budget, method, seed, a.protocol) in done:
                        continue
                    tag = f"{task}-{budget.rstrip('%')}-{method}-s{seed}"
                    rec = {"task": task, "budget": key_budget, "budget_params": None if ref else round(b),
                           "method": method, "seed": seed, "train_examples": a.train, "dev_examples": a.dev, "epochs": a.epochs,
                           "search_epochs": a.search_epochs}
                    if a.max_length != 64:
                        rec["max_length"] = a.max_length
                    if a.protocol:
                        rec["protocol"] = a.protocol
                    try:
                        cfg = work / f"{tag}.json"
                        search_s = None
                        if method.startswith("s3-"):
                            # s3-<space>[-2nd][-e<search epochs>]
                            parts = method.split("-")
                            space = parts[1]
                            order = ["--second-order"] if "2nd" in parts[2:] else []
                            epochs = next((int(x[1:]) for x in parts[2:] if x.startswith("e")), a.search_epochs)
                            rec["search_epochs"] = epochs
                            sdir = work / f"{tag}-search"
                            res, search_s = run(base + ["search", "--task", task, *data, "--budget", budget, "--space", space,
                                                        "--epochs", str(epochs), "--lr", "1e-3", "--seed", str(seed),
                                                        *order, "--out", str(sdir), "--overwrite", "--json", "--quiet"], log)
                            cfg = sdir / "structure.json"
                            rec.update(search_seconds=round(search_s, 1), supernet_dev=res.get("supernet_dev"),
                                       selected_params=res["selected_params"], selected=res["selected"])
                        elif method == "random":
                            if "M" not in cands_cache:
                                sdir = work / f"space-M-{shard[0]}-of-{shard[1]}"
                                if not (sdir / "candidates.json").exists():
                                    run(base + ["search", "--task", task, *data, "--budget", "1000", "--space", "M", "--candidates-only",
                                                "--out", str(sdir), "--overwrite", "--json", "--quiet"], log)
                                cands_cache["M"] = json.loads((sdir / "candidates.json").read_text())
                            specs = random_structure(cands_cache["M"], b, seed)
                            cfg.write_text(json.dumps({"deltas": specs}, indent=1))
                        elif method.startswith("xfer-"):
                            # xfer-<source task>-<search method>: the structure searched on another
                            # task (same budget and seed) retrained here.
                            _, src, smethod = method.split("-", 2)
                            scfg = work / f"{src}-{budget.rstrip('%')}-{smethod}-s{seed}-search" / "structure.json"
                            if not scfg.exists():
                                print(f"{tag}: {scfg} not there yet (run the source search first); left for a later pass",
                                      file=sys.stderr)
                                continue
                            cfg = scfg
                            sel = json.loads((scfg.parent / "result.json").read_text()) if (scfg.parent / "result.json").exists() else {}
                            rec.update(source_task=src, selected_params=sel.get("selected_params"))
                        elif method in MANUAL or method == "adalora":
                            specs = (adalora if method == "adalora" else MANUAL[method])(b)
                            if specs is None:
                                rec.update(skipped="does not fit the budget")
                                grid.append(out, rec)
                                continue
                            cfg.write_text(json.dumps({"deltas": specs}, indent=1))
                        if ref:
                            delta, lr = REFERENCES[method]
                        else:
                            delta, lr = ["--delta-config", str(cfg)], "1e-3"
                        res, train_s = run(base + ["train", "--task", task, *data, *delta, "--lr", lr, "--seed", str(seed),
                                                   *common_train, "--out", str(work / tag)], log)
                        rec.update(metric=res["metric"], score=res["score"], scores=res["scores"], delta_params=res["delta_params"],
                                   train_seconds=round(res["seconds"], 1), wall_seconds=round(train_s, 1))
                        if search_s is not None:
                            rec["search_over_retrain"] = round(search_s / max(train_s, 1e-9), 2)
                    except Exception as e:  # record and go on: one failure must not stop the grid
                        rec.update(error=str(e)[-500:])
                    grid.append(out, rec)
                    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
