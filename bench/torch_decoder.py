#!/usr/bin/env python3
"""PyTorch + PEFT side of `deltatune bench decoder`, on the same GGUF decoder dequantized to f32
by transformers (PyTorch has no quantized training path on CPU).

--mode train: LoRA (r 8, alpha 16, q_proj + v_proj, PEFT) training steps at --batch x --seq-len
  synthetic token ids, causal-LM loss on every position, AdamW (lr 1e-4): median step and
  forward milliseconds over --steps after --warmup, and this process's peak RSS.
--mode generate: greedy decoding speed without a delta and with the same LoRA (unmerged):
  decode tokens/s from generating --tokens and 1 new tokens (min_new_tokens forces the length).
Prints one JSON line. Needs torch, transformers, gguf and peft (a throwaway venv; never in CI).
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train(a):
    model, _ = load(a.model)
    model = lora(model)
    model.train()
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(256, model.config.vocab_size, (a.batch, a.seq_len), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_ms, fwd_ms, losses = [], [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        t1 = time.perf_counter()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if i >= a.warmup:
            step_ms.append((t2 - t0) * 1e3)
            fwd_ms.append((t1 - t0) * 1e3)
    step = statistics.median(step_ms)
    return {
        "batch": a.batch,
        "seq_len": a.seq_len,
        "step_ms_median": step,
        "fwd_ms_median": statistics.median(fwd_ms),
        "tokens_per_second": a.batch * a.seq_len / (step / 1e3),
        "peak_rss_mb": peak_rss_mb(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def decode_speed(model, ids, tokens, runs):
    def timed(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    timed(4)
    speeds = [(tokens - 1) / (timed(tokens) - timed(1)) for _ in range(runs)]
    return statistics.median(speeds)


def generate(a):
    model, tok = load(a.model)
    model.eval()
    ids = tok(a.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    base = decode_speed(model, ids, a.tokens, a.runs)
    with_lora = decode_speed(lora(model), ids, a.tokens, a.runs)
    return {"tokens": a.tokens, "none": base, "lora": with_lora}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the .gguf file")
    ap.add_argument("--mode", choices=["train", "generate"], required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt", default="The history of the city begins")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    r = train(a) if a.mode == "train" else generate(a)
    r["torch"] = torch.__version__
    print(json.dumps(r))


if __name__ == "__main__":
    main()
