#!/usr/bin/env python3
"""PyTorch + PEFT side of `deltatune bench cache`: seconds per training epoch of LoRA (r 8,
alpha 16, query+value) restricted to the top --top-layers layers (PEFT layers_to_transform), on
the first --train lines of SST-2, batch 32, max length 64 with dynamic padding, AdamW(wd 0.01),
mean pooling + linear head, dropout on. Evaluation is not timed. Prints one JSON line.
Needs torch, transformers and peft (a throwaway venv; never in CI).
"""
import argparse
import csv
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--sst2", required=True, help="directory with train.tsv")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--top-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from transformers import AutoModel, AutoTokenizer
    from peft import LoraConfig, get_peft_model
    rows = []
    with open(f"{a.sst2}/train.tsv", newline="", encoding="utf-8") as f:
        r = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        h = next(r)
        si, li = h.index("sentence"), h.index("label")
        for row in r:
            rows.append((row[si], int(row[li])))
            if len(rows) == a.train:
                break
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    enc = AutoModel.from_pretrained(a.model_dir, attn_implementation="eager", add_pooling_layer=False)
    n = enc.config.num_hidden_layers
    layers = list(range(n - a.top_layers, n))
    enc = get_peft_model(enc, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], layers_to_transform=layers,
                                         task_type="FEATURE_EXTRACTION"))
    head = nn.Linear(enc.config.hidden_size, 2)
    params = [p for p in enc.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(a.seed)
    times = []
    for ep in range(a.epochs):
        enc.train()
        perm = torch.randperm(len(rows), generator=g).tolist()
        t0 = time.perf_counter()
        for b in range(0, len(rows), 32):
            idx = perm[b:b + 32]
            e = tok([rows[i][0] for i in idx], padding="longest", truncation=True, max_length=64, return_tensors="pt")
            y = torch.tensor([rows[i][1] for i in idx])
            hs = enc(input_ids=e["input_ids"], attention_mask=e["attention_mask"]).last_hidden_state
            m = e["attention_mask"].unsqueeze(-1).to(hs.dtype)
            loss = F.cross_entropy(head((hs * m).sum(1) / m.sum(1)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"impl": "pytorch+peft", "top_layers": a.top_layers, "epoch_seconds": [round(t, 2) for t in times],
                      "train": len(rows), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
