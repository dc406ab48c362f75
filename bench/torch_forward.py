#!/usr/bin/env python3
"""PyTorch side of `deltatune bench forward`: eval-mode forward throughput of a BERT model.

Protocol (identical on the Rust side): batch 32 x 64 tokens, every token real ([CLS], random ids
in [1000, 30000) drawn with torch.Generator seeded 42, [SEP]), fp32, eager attention, no_grad,
--warmup untimed passes, then --iters timed passes; prints one JSON line with the median.
Needs torch + transformers (install them in a throwaway venv, never in CI).
"""
import argparse
import json
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModel
    model = AutoModel.from_pretrained(a.model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(1000, 30000, (a.batch, a.seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        for i in range(a.warmup + a.iters):
            t0 = time.perf_counter()
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            (h * m).sum(1) / m.sum(1)
            if i >= a.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "batch": a.batch, "seq_len": a.seq_len, "forward_ms_median": round(med, 2),
                      "forward_ms_min": round(min(times), 2),
                      "sentences_per_s": round(a.batch / med * 1e3, 1)}))


if __name__ == "__main__":
    main()
