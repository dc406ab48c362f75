#!/usr/bin/env python3
"""Small random-weight decoders of the architectures deltatune reads (Qwen 2, Qwen 3, Mistral with a
short sliding window, Phi-3 with its fused projections), made with transformers from a config, and
their reference outputs, for deltatune's parity tests.

For each architecture the script writes `OUT_DIR/<arch>/config.json` and `model.safetensors`
(2 layers, hidden 32, 4 query heads over 2 key-value heads, vocabulary 256; weights drawn with a
fixed seed and a large spread, biases and norm weights randomised too, so every parameter shows in
the outputs) and one JSON file of references: for each prompt of token ids, per position the
first 48 logits, the argmax and the log-sum-exp over the vocabulary, and the greedy continuation
of 8 tokens. It also writes the same weights as `OUT_DIR/<arch>/model.gguf` (F32, llama.cpp's
tensor names and metadata keys for the architecture, written with the `gguf` package; Mistral as
llama.cpp's converter does: architecture `llama`, query/key rows in its interleaved rotary order),
without a vocabulary: the tests feed token ids.

An existing OUT_DIR is refused unless --overwrite is given.

Run in a throwaway venv (never in CI):
  python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch transformers safetensors gguf
  /tmp/venv-torch/bin/python tools/tiny_decoder_reference.py crates/deltatune/tests/fixtures/tiny --overwrite
"""
import json
import sys
from pathlib import Path

import torch
import gguf
import numpy as np
from transformers import AutoModelForCausalLM, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "qwen2": Qwen2Config(**COMMON),
    "qwen3": Qwen3Config(**COMMON, head_dim=16, attention_bias=False),
    # A window shorter than the prompts, so that the sliding mask matters.
    "mistral": MistralConfig(**COMMON, sliding_window=6),
    # Fused qkv_proj and gate_up_proj; a sliding window in every layer.
    "phi3": Phi3Config(**COMMON, sliding_window=7, original_max_position_embeddings=128),
}
# llama.cpp's architecture name of each.
GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "phi3": "phi3"}
# HF module → llama.cpp tensor name inside a block.
BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
PROMPTS = [
    [1, 17, 200, 33, 5, 99, 250, 7, 7, 7, 64, 128, 3, 45, 46, 47, 48, 255, 10, 11],
    [1, 42, 9, 180, 2, 77],
]
SLICE = 48
GREEDY = 8


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))


def interleave_rotary(w, heads):
    """HF's two rotary halves per head → llama.cpp's interleaved rows (its converter's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, cfg, model):
    ga = GGUF_ARCH[arch]
    w = gguf.GGUFWriter(str(path), ga)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    for name, t in model.state_dict().items():
        a = t.detach().to(torch.float32).numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, n, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{n}.{BLOCK_NAMES[module]}.{kind}"
            if ga == "llama" and module == "self_attn.q_proj":
                a = interleave_rotary(a, cfg.num_attention_heads)
            elif ga == "llama" and module == "self_attn.k_proj":
                a = interleave_rotary(a, cfg.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def summary(logits):
    return {
        "first": [[round(float(x), 6) for x in row[:SLICE]] for row in logits],
        "argmax": [int(i) for i in logits.argmax(-1)],
        "logsumexp": [round(float(x), 6) for x in torch.logsumexp(logits, -1)],
    }


def main():
    out = Path(sys.argv[1])
    if out.exists() and any(out.iterdir()) and "--overwrite" not in sys.argv[2:]:
        sys.exit(f"{out} exists and is not empty; pass --overwrite to replace its fixtures")
    refs = {}
    for k, (arch, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(k)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
        randomise(model, 100 + k)
        d = out / arch
        d.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        (d / "generation_config.json").unlink(missing_ok=True)
        write_gguf(d / "model.gguf", arch, cfg, model)
        rows = []
        for ids in PROMPTS:
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(x).logits[0]
                gen = model.generate(x, max_new_tokens=GREEDY, do_sample=False, eos_token_id=None, pad_token_id=0,
                                     attention_mask=torch.ones_like(x))
            rows.append({"ids": ids, **summary(logits), "greedy": [int(t) for t in gen[0, len(ids):]]})
        refs[arch] = rows
    import transformers

    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "slice": SLICE}
    (out / "reference.json").write_text(json.dumps({"meta": meta, "models": refs}, indent=None) + "\n")


if __name__ == "__main__":
    main()
