#!/usr/bin/env python3
"""The same LoRA training run from Python, once with the `deltatune` package and once with
PyTorch + PEFT: LoRA r 8, alpha 16 on query+value of all-MiniLM-L6-v2 with a mean-pooling linear
head, the first --train examples of SST-2's train split, batch 32, max length 64, lr 5e-4,
AdamW (weight decay 0.01), --epochs epochs, linear decay with 6% warm-up, dropout on; scored by
accuracy on SST-2's dev split. Prints one JSON line: median milliseconds per optimizer step,
peak resident memory (MB), dev accuracy, wall seconds.

    python bench/python_vs_peft.py --side deltatune --model-dir M --sst2 DIR   # a venv with deltatune
    python bench/python_vs_peft.py --side peft --model-dir M --sst2 DIR        # a venv with torch + peft

Needs no network. The PEFT side needs torch, transformers and peft (a throwaway venv; never in CI).
"""
import argparse
import csv
import json
import resource
import statistics
import time


def read_tsv(path, limit=None):
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        h = next(r)
        si, li = h.index("sentence"), h.index("label")
        for row in r:
            rows.append((row[si], int(row[li])))
            if limit and len(rows) == limit:
                break
    return rows


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_deltatune(a, train, dev):
    import deltatune as dt

    model = dt.get_peft_model(dt.load(a.model_dir, verbose=False), dt.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    step_times = []
    last = [time.perf_counter()]

    def on_event(ev):
        if ev["event"] == "step":
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

    t0 = time.perf_counter()
    last[0] = t0
    out = model.train(
        [t for t, _ in train],
        labels=[str(y) for _, y in train],
        eval_data=[t for t, _ in dev],
        eval_labels=[str(y) for _, y in dev],
        output_dir=a.out,
        overwrite=True,
        verbose=False,
        callback=on_event,
        epochs=a.epochs,
        batch_size=32,
        max_length=64,
        lr=5e-4,
        seed=a.seed,
    )
    wall = time.perf_counter() - t0
    preds = model.predict([t for t, _ in dev], batch_size=64)
    acc = sum(int(p["label"]) == y for p, (_, y) in zip(preds, dev)) / len(dev)
    return {"side": "deltatune (Python)", "steps": out["steps"], "ms_per_step": 1000 * statistics.median(step_times[1:] or step_times), "peak_mb": peak_mb(), "dev_accuracy": acc, "wall_s": wall}


def run_peft(a, train, dev):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    enc = AutoModel.from_pretrained(a.model_dir, attn_implementation="eager", add_pooling_layer=False)
    enc = get_peft_model(enc, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, task_type="FEATURE_EXTRACTION"))
    head = nn.Linear(enc.config.hidden_size, 2)
    params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    steps_total = a.epochs * ((len(train) + 31) // 32)
    warm = max(1, int(0.06 * steps_total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps_total - s) / max(1, steps_total - warm)))
    g = torch.Generator().manual_seed(a.seed)

    def pooled(e):
        hs = enc(input_ids=e["input_ids"], attention_mask=e["attention_mask"]).last_hidden_state
        m = e["attention_mask"].unsqueeze(-1).float()
        return (hs * m).sum(1) / m.sum(1).clamp(min=1e-9)

    times = []
    t0 = time.perf_counter()
    for _ in range(a.epochs):
        enc.train()
        perm = torch.randperm(len(train), generator=g).tolist()
        for b in range(0, len(train), 32):
            s = time.perf_counter()
            idx = perm[b : b + 32]
            e = tok([train[i][0] for i in idx], padding="longest", truncation=True, max_length=64, return_tensors="pt")
            y = torch.tensor([train[i][1] for i in idx])
            loss = F.cross_entropy(head(pooled(e)), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            times.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    enc.eval()
    correct = 0
    with torch.no_grad():
        for b in range(0, len(dev), 64):
            chunk = dev[b : b + 64]
            e = tok([t for t, _ in chunk], padding="longest", truncation=True, max_length=64, return_tensors="pt")
            pred = head(pooled(e)).argmax(-1).tolist()
            correct += sum(int(p == y) for p, (_, y) in zip(pred, chunk))
    return {"side": "PyTorch + PEFT", "steps": len(times), "ms_per_step": 1000 * statistics.median(times[1:]), "peak_mb": peak_mb(), "dev_accuracy": correct / len(dev), "wall_s": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["deltatune", "peft"], required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--sst2", required=True, help="directory with train.tsv and dev.tsv")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--dev", type=int, default=None, help="score on the first N dev examples (default: all 872)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="runs/python-vs-peft")
    a = ap.parse_args()
    train = read_tsv(f"{a.sst2}/train.tsv", a.train)
    dev = read_tsv(f"{a.sst2}/dev.tsv", a.dev)
    r = run_deltatune(a, train, dev) if a.side == "deltatune" else run_peft(a, train, dev)
    r.update({"train_examples": len(train), "dev_examples": len(dev), "epochs": a.epochs})
    print(json.dumps(r))


if __name__ == "__main__":
    main()
