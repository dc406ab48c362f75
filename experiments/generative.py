#!/usr/bin/env python3
"""S3Delta on a generative model: classification as text-to-text on the default decoder
(SmolLM2-135M-Instruct through its frozen Q4_1 base), closer to the paper's T5 setting.

For each (task, budget, seed): the structure search on the decoder (`deltatune search --lm`,
space L: rank-1 LoRA on every block linear, first-order, the training examples split 50/50),
retrained with `train-lm --delta-config`; against a random structure of the same space that fits
the budget, and the manual placement (rank-1 LoRA on q_proj and v_proj of the top layers, as many
as the budget holds). References without a budget: the untuned model (its verbalizer accuracy)
and LoRA r=8 on q_proj,v_proj (train-lm's default). Budgets are shares of the decoder's
134,515,008 parameters. Full fine-tuning of the decoder is not run: the frozen base is quantized.

Protocol (identical for every method): the first --train training examples, the first --dev dev
examples, max length --max-length, batch 8, --epochs epochs, AdamW (lr 1e-3 for LoRA, the search's
weight lr 1e-3 and α lr 0.1), the task's default template and label words, accuracy by the label
words' log-probability after the prompt. Appends one JSON line per run to the results file and
skips finished runs when restarted.

`--model FILE.gguf` runs the same protocol on another decoder (Gemma 3 270M: `deltatune setup
--decoder gemma3` fetches it): budgets become shares of that model's parameters (`deltatune
inspect --json`), the manual placement's sizes and layer count come from its space-L candidates,
and its records carry its file name as `model`, so the grids of several models share one file.

Usage:
  python3 experiments/generative.py --bin target/release/deltatune --data-dir ../shared/data \
      --out experiments/results/s3delta_generative.jsonl [--tasks sst2] [--budgets 0.0035%] [--seeds 1,2]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
from s3delta import random_structure  # noqa: E402  (space L candidates: rank-1 LoRA groups)

DECODER = 134_515_008
LAYERS = 30
DEFAULT_MODEL = "SmolLM2-135M-Instruct Q4_1"


def run(cmd, log):
    return grid.run_json(cmd, log)


def manual_lora(b, sizes, n_layers=LAYERS):
    """Rank-1 LoRA on q_proj and v_proj of the top layers, as many layers as fit."""
    per_layer = sizes["q"] + sizes["v"]
    layers = min(n_layers, int(b // per_layer))
    if layers == 0:
        return [{"method": "lora", "name": "lora", "r": 1, "lora_alpha": 16,
                 "target_modules": [f"model.layers.{n_layers - 1}.self_attn.q_proj"]}] if b >= sizes["q"] else None
    return [{"method": "lora", "name": "lora", "r": 1, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
             "layers_to_transform": list(range(n_layers - layers, n_layers))}]


def model_facts(a, base, log, work):
    """(label, parameter count, layers, rank-1 q/v sizes, model flags) of the decoder under test."""
    if not a.model:
        return DEFAULT_MODEL, DECODER, LAYERS, {"q": 2 * 576, "v": 576 + 192}, []
    flags = ["--model", a.model]
    info, _ = run(base + ["inspect", *flags, "--json"], log)
    cdir = work / f"space-L-{Path(a.model).stem}"
    if not (cdir / "candidates.json").exists():
        run(base + ["search", "--lm", *flags, "--task", a.tasks.split(",")[0], "--data-dir", a.data_dir, "--max-train", "8",
                    "--budget", "1000", "--space", "L", "--candidates-only", "--out", str(cdir), "--overwrite", "--json",
                    "--quiet"], log)
    cands = json.loads((cdir / "candidates.json").read_text())
    layer0 = {c["path"].rsplit(".", 1)[1]: c["params"] for c in cands if c["layer"] == 0}
    layers = 1 + max(c["layer"] for c in cands)
    return Path(a.model).name, info["total_params"], layers, {"q": layer0["q_proj"], "v": layer0["v_proj"]}, flags


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid.common_args(ap, "experiments/results/s3delta_generative.jsonl", "runs/generative")
    ap.add_argument("--tasks", default="sst2")
    ap.add_argument("--budgets", default="0.0035%,0.0139%")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--methods", default="untuned,lora8,s3-L,random,manual-lora")
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--dev", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--search-epochs", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--model", help="a .gguf decoder (default: the default decoder, SmolLM2-135M Q4_1)")
    a = ap.parse_args()
    shard = grid.parse_shard(a.shard)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    done = grid.done_keys(out, lambda r: (r.get("model", DEFAULT_MODEL), r["task"], r["budget"], r["method"], r["seed"]))
    base = [a.bin, "--threads", str(a.threads)]
    label, n_params, n_layers, sizes, mflags = model_facts(a, base, log, work)
    stem = "" if not a.model else Path(a.model).stem + "-"
    data = [*mflags, "--data-dir", a.data_dir, "--max-train", str(a.train), "--max-dev", str(a.dev), "--max-length", str(a.max_length)]
    cands = None
    cell = -1
    for task in a.tasks.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            for budget in a.budgets.split(","):
                b = n_params * float(budget.rstrip("%")) / 100.0
                for method in a.methods.split(","):
                    ref = method in ("untuned", "lora8")
                    if ref and (budget != a.budgets.split(",")[0] or (method == "untuned" and seed != int(a.seeds.split(",")[0]))):
                        continue
                    key_budget = "-" if ref else budget
                    cell += 1
                    if not grid.mine(cell, shard) or (label, task, key_budget, method, seed) in done:
                        continue
                    tag = f"{stem}{task}-{budget.rstrip('%')}-{method}-s{seed}"
                    rec = {"task": task, "budget": key_budget, "budget_params": None if ref else round(b), "method": method,
                           "seed": seed, "model": label, "train_examples": a.train, "dev_examples": a.dev,
                           "epochs": a.epochs, "search_epochs": a.search_epochs, "max_length": a.max_length,
                           "threads": a.threads}
                    try:
                        search_s = None
                        cfg = work / f"{tag}.json"
                        if method == "untuned":
                            # The untuned score is train-lm's "before" (one step on 8 examples follows).
                            res, wall = run(base + ["train-lm", *mflags, "--task", task, "--data-dir", a.data_dir, "--max-train", "8",
                                                    "--max-dev", str(a.dev), "--max-length", str(a.max_length), "--epochs", "1",
                                                    "--json"], log)
                            rec.update(metric=res["metric"], score=res["before"], wall_seconds=round(wall, 1))
                            grid.append(out, rec)
                            print(json.dumps(rec), flush=True)
                            continue
                        if method == "s3-L":
                            sdir = work / f"{tag}-search"
                            res, search_s = run(base + ["search", "--lm", "--task", task, *data, "--budget", budget, "--space", "L",
                                                        "--epochs", str(a.search_epochs), "--batch-size", "8", "--lr", "1e-3",
                                                        "--seed", str(seed), "--out", str(sdir), "--overwrite", "--json", "--quiet"], log)
                            cfg = sdir / "structure.json"
                            rec.update(search_seconds=round(search_s, 1), supernet_dev=res.get("supernet_dev"),
                                       selected_params=res["selected_params"], selected=res["selected"])
                        elif method == "random":
                            if cands is None:
                                cdir = work / f"space-L-{stem}{shard[0]}-of-{shard[1]}"
                                if not (cdir / "candidates.json").exists():
                                    run(base + ["search", "--lm", "--task", task, *data, "--budget", "1000", "--space", "L",
                                                "--candidates-only", "--out", str(cdir), "--overwrite", "--json", "--quiet"], log)
                                cands = json.loads((cdir / "candidates.json").read_text())
                            cfg.write_text(json.dumps({"deltas": random_structure(cands, b, seed)}, indent=1))
                        elif method == "manual-lora":
                            specs = manual_lora(b, sizes, n_layers)
                            if specs is None:
                                rec.update(skipped="does not fit the budget")
                                grid.append(out, rec)
                                continue
                            cfg.write_text(json.dumps({"deltas": specs}, indent=1))
                        delta = ["--delta", "lora:r=8,lora_alpha=16,target=q_proj+v_proj"] if method == "lora8" else ["--delta-config", str(cfg)]
                        res, wall = run(base + ["train-lm", "--task", task, *data, *delta, "--epochs", str(a.epochs), "--batch-size", "8",
                                                "--lr", "1e-3", "--seed", str(seed), "--no-baseline", "--json"], log)
                        rec.update(metric=res["metric"], score=res["after"], delta_params=res["trainable_params"],
                                   train_seconds=res["train_seconds"], wall_seconds=round(wall, 1))
                        if search_s is not None:
                            rec["search_over_retrain"] = round(search_s / max(wall, 1e-9), 2)
                    except Exception as e:
                        rec.update(error=str(e)[-500:])
                    grid.append(out, rec)
                    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
