#!/usr/bin/env python3
"""Data-parallel scaling of `deltatune train`, measured on this machine and projected to clusters.

Runs the same training four ways, side by side: one process with 1 thread, `mpirun -np 2` with 1
thread per rank (the global batch split in two), one process with 2 threads (each kernel split
over both), and one process with `--data-parallel 2` (two ranks as threads, one core each). Step times come from the runs' own metrics.jsonl (the steps after the
first two, evaluation excluded); the exchange time per step from the `comm_s` the ranks record.
Then, from the measured one-rank step time and the size of the all-reduce, the expected step time
at 8, 64 and 512 ranks under two network models (stated in the output), for weak scaling (each rank
keeps its batch; the global batch grows) and strong scaling (a fixed global batch is split).

Needs a deltatune built with `--features deltatune-cli/mpi` and `mpirun` (scripts/setup-mpi.sh).

  python3 bench/data_parallel.py --bin target/release/deltatune --data-dir ../shared/data \
      --json experiments/results/data_parallel_DATE.json
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NETWORKS = [
    # name, latency per message (s), bandwidth (bytes/s)
    ("100 Gb/s InfiniBand (alpha 2 us, 12 GB/s)", 2e-6, 12e9),
    ("25 Gb/s Ethernet (alpha 25 us, 2.8 GB/s)", 25e-6, 2.8e9),
]


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(cmd, env=None):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1]), time.time() - t


def step_stats(run_dir, skip):
    recs = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("kind") == "train"]
    a, b = train[skip - 1], train[-1]
    n = b["step"] - a["step"]
    comm = [r.get("comm_s") or 0.0 for r in train[skip:]]
    return (b["elapsed_s"] - a["elapsed_s"]) / n, sum(comm) / max(len(comm), 1), min(comm), n


def ring(n, bytes_, alpha, bw):
    return 0.0 if n == 1 else 2 * (n - 1) * alpha + 2 * (n - 1) / n * bytes_ / bw


def halving_doubling(n, bytes_, alpha, bw):
    return 0.0 if n == 1 else 2 * math.ceil(math.log2(n)) * alpha + 2 * (n - 1) / n * bytes_ / bw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/deltatune")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--delta", default="lora:r=8,lora_alpha=16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    common = ["train", "--task", a.task, "--data-dir", a.data_dir, "--delta", a.delta, "--batch-size", str(a.batch_size),
              "--max-length", str(a.max_length), "--max-train", str(a.batch_size * a.steps), "--max-dev", "64",
              "--max-steps", str(a.steps), "--no-bucket", "--checkpoint-every", "1000000", "--quiet", "--json"]
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "PMIX_"))}
    cases = [
        ("1 process x 1 thread", [a.bin, "--threads", "1"], 1),
        ("mpirun -np 2, 1 thread each", mpirun + ["-np", "2", a.bin, "--threads", "1"], 2),
        ("1 process x 2 threads", [a.bin, "--threads", "2"], 1),
        ("1 process, --data-parallel 2", [a.bin, "--threads", "2"], 2),
    ]
    rows = []
    for name, prefix, ranks in cases:
        out = work / name.replace(" ", "_").replace(",", "").replace("-", "")
        extra = ["--data-parallel", "2"] if "--data-parallel" in name else []
        summary, wall = run(prefix + common + extra + ["--out", str(out)], env)
        step_s, comm_s, comm_min, n = step_stats(out, a.skip)
        rows.append({"case": name, "ranks": ranks, "step_s": step_s, "steps_per_s": 1 / step_s,
                     "examples_per_s": a.batch_size / step_s, "comm_ms_per_step": comm_s * 1e3,
                     "comm_ms_min": comm_min * 1e3, "timed_steps": n,
                     "wall_s": round(wall, 1), "summary_comm_seconds": summary.get("comm_seconds")})
    t1 = rows[0]["step_s"]
    # The exchange: every trainable tensor (deltas + head) once, one presence flag per tensor.
    trainable = summary["trainable_params"]
    raw = (work / "1_process_x_1_thread" / "final" / "delta.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    tensors = len([k for k in header if k != "__metadata__"])
    exchange_bytes = 4 * (trainable + tensors + 3)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {a.task}, {a.delta}, batch {a.batch_size} x {a.max_length} tokens")
    print(f"all-reduce per step: {trainable} trainable floats = {exchange_bytes / 1e3:.0f} KB")
    print("comm: the gradient exchange per step, mean (it includes waiting for the slower rank) and minimum (its own cost)")
    print(f"{'case':32} {'step s':>8} {'steps/s':>8} {'ex/s':>8} {'comm ms':>8} {'min ms':>7} {'vs 1x1':>7}")
    for r in rows:
        r["speedup"] = t1 / r["step_s"]
        print(f"{r['case']:32} {r['step_s']:8.3f} {r['steps_per_s']:8.2f} {r['examples_per_s']:8.1f} {r['comm_ms_per_step']:8.2f} {r['comm_ms_min']:7.2f} {r['speedup']:7.2f}")
    # Projection. Weak scaling: each rank keeps batch b; step time = t1 + overhead + all-reduce,
    # where the overhead is the smallest exchange time measured here at 2 ranks (the copies and the
    # shared-memory transfer without waiting), kept as a fixed cost; ranks are assumed balanced.
    # Speed-up in examples/s = N t1 / (t1 + overhead + T). Strong scaling: a global batch of 8 b
    # split over N ranks; each rank's compute = t1 * 8 / N (linear in its rows).
    overhead = rows[1]["comm_ms_min"] / 1e3
    projections = []
    print(f"\nprojected (from the measured 1-rank step {t1:.3f} s and the {overhead * 1e3:.2f} ms exchange cost measured at 2 ranks;")
    print("compute scales with rows per rank; the all-reduce over the network as modelled):")
    # Two per-rank step times: the one measured (one core), and a 16x faster rank (a 16-core node
    # with perfect threading) — the harder case for scaling, as communication weighs more.
    for label, step in (("1-core rank", t1), ("16x faster rank", t1 / 16)):
        for net, alpha, bw in NETWORKS:
            for n in (2, 8, 64, 512):
                t_ring = ring(n, exchange_bytes, alpha, bw)
                t_hd = halving_doubling(n, exchange_bytes, alpha, bw)
                t = min(t_ring, t_hd)
                weak = n * step / (step + overhead + t)
                g = 8 * a.batch_size
                strong = None if g < n else (step * 8) / (step * 8 / n + overhead + t)
                projections.append({"rank_step_s": step, "rank": label, "network": net, "ranks": n, "allreduce_ms_ring": t_ring * 1e3,
                                    "allreduce_ms_halving_doubling": t_hd * 1e3, "weak_speedup": weak, "weak_efficiency": weak / n,
                                    "strong_speedup_global_batch_8b": strong})
                sp = f"{strong:6.1f}x" if strong else "   n/a"
                print(f"  {label:15} {net:42} N={n:4}: all-reduce {t * 1e3:6.3f} ms; weak {weak:6.1f}x ({weak / n:5.1%}); strong (batch {g}) {sp}")
    full = 4 * 22_713_216
    for net, alpha, bw in NETWORKS:
        t = min(ring(64, full, alpha, bw), halving_doubling(64, full, alpha, bw))
        print(f"  (full fine-tuning would exchange {full / 1e6:.0f} MB per step: {t * 1e3:.0f} ms at 64 ranks on {net.split(' (')[0]})")
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(), "task": a.task, "delta": a.delta,
           "batch_size": a.batch_size, "max_length": a.max_length, "trainable_params": trainable, "exchange_bytes": exchange_bytes,
           "measured": rows, "projected": projections,
           "assumptions": "compute per rank scales linearly with its rows; the optimizer step and data loading are negligible "
                          "(LoRA: microseconds); the smallest exchange time measured at 2 ranks on this machine (copies and transfer, no waiting) is added to every step; ranks are balanced (no stragglers); all-reduce = min(ring: 2(N-1) alpha + 2(N-1)/N M/B, recursive halving-doubling: "
                          "2 log2(N) alpha + 2(N-1)/N M/B); no overlap of communication with compute; one rank per node using all its cores"}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
