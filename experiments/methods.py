#!/usr/bin/env python3
"""Every delta method of deltatune on SST-2, RTE, CoLA and STS-B with the default model.

One `deltatune train` run per (task, method), each appending one JSON line to the results file
(finished pairs are skipped when the script is restarted). `experiments/tables.py methods` turns
the results file into the README table, with the exact command of every run.

Protocol (identical for every method; CPU-sized so that the whole table runs in about an hour on
two cores): the first --train examples of each task's training split (file order), the task's full
dev split, max length 64, batch 32, --epochs epochs, AdamW (weight decay 0.01, 6% warm-up then
linear decay, clipping at 1.0), dev evaluation after every epoch, the best epoch reported, seed 42.
Learning rates: the method's usual one (below); full fine-tuning 5e-5.

Usage:
  python3 experiments/methods.py --bin target/release/deltatune --data-dir ../shared/data \
      --out experiments/results/methods.jsonl [--tasks sst2,rte] [--methods lora,bitfit] [--shard I/N]

Spread over processes like experiments/s3delta.py (experiments/grid.py): `--shard I/N`, a Slurm
job array or `mpirun -np N python3 experiments/methods.py ...`.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402

TASKS = ["sst2", "rte", "cola", "stsb"]
# (name, --delta spec, learning rate)
METHODS = [
    ("lora", "lora:r=8,lora_alpha=16", "1e-3"),
    ("dora", "dora:r=8,lora_alpha=16", "1e-3"),
    ("vera", "vera:r=256", "1e-2"),
    ("ia3", "ia3", "3e-3"),
    ("adapter", "adapter", "1e-3"),
    ("houlsby", "houlsby", "1e-3"),
    ("parallel_adapter", "parallel_adapter", "1e-3"),
    ("compacter", "compacter", "3e-3"),
    ("low_rank_adapter", "low_rank_adapter", "3e-3"),
    ("prefix", "prefix", "1e-2"),
    ("prompt", "prompt", "3e-2"),
    ("bitfit", "bitfit", "3e-3"),
    ("ln_tuning", "ln_tuning", "3e-3"),
    ("finetune-top", "finetune:target=encoder.layer.5", "1e-4"),
    ("full", "full", "5e-5"),
    # LyCORIS / PEFT methods at PEFT's defaults on query/value; rates as for LoRA-family methods
    # (LoKr has ~10x fewer parameters than LoRA at the defaults, so a larger rate).
    ("loha", "loha", "1e-3"),
    ("lokr", "lokr", "3e-3"),
    ("oft", "oft", "1e-3"),
    # total_step is filled in by `deltatune train` from epochs x steps per epoch.
    ("adalora", "adalora:init_r=12,target_r=8,lora_alpha=16", "1e-3"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/deltatune")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="experiments/results/methods.jsonl")
    ap.add_argument("--work", default="runs/methods")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(m[0] for m in METHODS))
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard", default=None, help="I/N: run every N-th cell from the I-th (default: from a job array or mpirun)")
    a = ap.parse_args()
    shard = grid.parse_shard(a.shard)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if "error" not in r:
                done.add((r["task"], r["method"]))
    wanted = set(a.methods.split(","))
    cell = -1
    for task in a.tasks.split(","):
        for name, spec, lr in METHODS:
            if name not in wanted:
                continue
            cell += 1
            if not grid.mine(cell, shard) or (task, name) in done:
                continue
            cmd = ["deltatune", "--threads", str(a.threads), "train", "--task", task, "--delta", spec, "--lr", lr,
                   "--max-train", str(a.train), "--max-length", "64", "--batch-size", "32", "--epochs", str(a.epochs),
                   "--seed", "42"]
            full = [a.bin] + cmd[1:] + ["--data-dir", a.data_dir, "--out", f"{a.work}/{task}-{name}", "--overwrite",
                                        "--checkpoint-every", "1000000", "--quiet", "--json"]
            t = time.time()
            p = subprocess.run(full, capture_output=True, text=True, env=grid.child_env())
            rec = {"task": task, "method": name, "spec": spec, "lr": lr, "train_examples": a.train, "epochs": a.epochs,
                   "command": " ".join(cmd), "date": time.strftime("%Y-%m-%d")}
            if p.returncode != 0:
                rec["error"] = p.stderr[-800:]
            else:
                res = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])
                rec.update(metric=res["metric"], score=res["score"], scores=res.get("scores"),
                           trainable_params=res["trainable_params"], delta_params=res.get("delta_params"),
                           total_params=res["total_params"], seconds=round(res["seconds"], 1),
                           wall_seconds=round(time.time() - t, 1), steps=res["steps"])
            grid.append(out, rec)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
