#!/usr/bin/env python3
"""Combinations of delta methods and their convergence (the Delta Tuning study's analyses).

LoRA, a bottleneck adapter, BitFit and prompt tuning, each alone and in every combination (15 runs
per task and seed), attached together to one frozen backbone and trained at matched settings: the
same learning rate for every combination (--lr; the methods' usual rates span 1e-3 for LoRA and
adapters to 3e-2 for prompts, so one shared rate is what "matched" can mean), the learnable
protocol of experiments/s3delta.py (first --train training examples, first --dev dev examples,
max length 128, batch 32, --epochs epochs, AdamW with weight decay 0.01, 6% warm-up then linear
decay, clipping at 1.0) and a dev evaluation every --eval-every steps, so that each record holds
the whole dev curve. `experiments/tables.py combos` renders the table and the convergence figure
(dev score against training steps for every combination) from the results file.

Usage:
  python3 experiments/combos.py --bin target/release/deltatune --data-dir ../shared/data \
      --out experiments/results/combos.jsonl [--tasks sst2] [--seeds 1] [--shard I/N]

Resumable: a finished (task, combination, seed, lr) is skipped when the script is restarted.
Spread over processes with `--shard I/N`, a Slurm job array or mpirun (experiments/grid.py).
"""
import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402

# (name, --delta spec): every method at its usual setting.
METHODS = [
    ("lora", "lora:r=8,lora_alpha=16"),
    ("adapter", "adapter"),
    ("bitfit", "bitfit"),
    ("prompt", "prompt"),
]


def combinations():
    """Every non-empty subset of METHODS, singles first, in a fixed order."""
    out = []
    for k in range(1, len(METHODS) + 1):
        out += list(itertools.combinations(METHODS, k))
    return out


def curve(run_dir):
    """[(step, primary dev score)] from a run's metrics.jsonl."""
    pts = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "eval":
            pts.append([r["step"], round(r["score"], 5)])
    return pts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid.common_args(ap, "experiments/results/combos.jsonl", "runs/combos", threads=1)
    ap.add_argument("--tasks", default="sst2")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--combos", default=None, help="only these combinations, e.g. lora,lora+bitfit")
    ap.add_argument("--lr", default="3e-3")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--dev", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=20)
    a = ap.parse_args()
    shard = grid.parse_shard(a.shard)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    done = grid.done_keys(out, lambda r: (r["task"], r["combo"], r["seed"], r["lr"]))
    wanted = set(a.combos.split(",")) if a.combos else None
    cell = -1
    for task in a.tasks.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            for combo in combinations():
                name = "+".join(m for m, _ in combo)
                if wanted is not None and name not in wanted:
                    continue
                cell += 1
                if not grid.mine(cell, shard) or (task, name, seed, a.lr) in done:
                    continue
                deltas = [x for _, spec in combo for x in ("--delta", spec)]
                cmd = ["deltatune", "--threads", str(a.threads), "train", "--task", task, *deltas, "--lr", a.lr,
                       "--max-train", str(a.train), "--max-dev", str(a.dev), "--max-length", str(a.max_length),
                       "--batch-size", "32", "--epochs", str(a.epochs), "--eval-every", str(a.eval_every),
                       "--seed", str(seed)]
                run_dir = work / f"{task}-{name}-s{seed}-lr{a.lr}"
                full = [a.bin] + cmd[1:] + ["--data-dir", a.data_dir, "--out", str(run_dir), "--overwrite",
                                            "--checkpoint-every", "1000000", "--quiet", "--json"]
                t = time.time()
                p = subprocess.run(full, capture_output=True, text=True, env=grid.child_env())
                rec = {"task": task, "combo": name, "methods": [m for m, _ in combo], "seed": seed, "lr": a.lr,
                       "train_examples": a.train, "dev_examples": a.dev, "epochs": a.epochs, "max_length": a.max_length,
                       "eval_every": a.eval_every, "command": " ".join(cmd), "date": time.strftime("%Y-%m-%d")}
                if p.returncode != 0:
                    rec["error"] = p.stderr[-800:]
                else:
                    res = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
                    rec.update(metric=res["metric"], score=res["score"], delta_params=res.get("delta_params"),
                               trainable_params=res["trainable_params"], steps=res["steps"],
                               train_seconds=round(res["seconds"], 1), wall_seconds=round(time.time() - t, 1),
                               curve=curve(run_dir))
                grid.append(out, rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "curve"}), flush=True)


if __name__ == "__main__":
    main()
