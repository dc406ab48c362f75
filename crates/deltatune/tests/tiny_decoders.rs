//! Qwen 2 (q/k/v biases), Qwen 3 (query/key norms, head_dim ≠ hidden/heads), Mistral (a sliding
//! window of 6 under 20-token prompts) and Phi-3 (fused qkv_proj and gate_up_proj, a window of 7)
//! read from HF safetensors directories and from GGUF files of the same weights, against
//! transformers on the small random-weight checkpoints of `tools/tiny_decoder_reference.py`:
//! logits on every position, and the greedy continuation through the KV cache.

use crate::common::fixture;
use candle_core::{Device, Tensor};
use deltatune::backbone::llama::{last_position, KvCache, LlamaModel};
use deltatune::attach::{self, AttachOptions};
use deltatune::delta::DeltaSpec;
use deltatune::ForwardCtx;

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny/reference.json")).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

const ARCHS: [&str; 4] = ["qwen2", "qwen3", "mistral", "phi3"];

/// PEFT's default LoRA targets for the model type, per layer.
fn default_lora_targets(arch: &str) -> Vec<&'static str> {
    if arch == "phi3" {
        vec!["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    } else {
        vec!["self_attn.q_proj", "self_attn.v_proj"]
    }
}

/// Checks `m` (loaded from `what`) against transformers' outputs for `arch`.
fn check(m: LlamaModel, r: &serde_json::Value, arch: &str, what: &str) {
    let slice = r["meta"]["slice"].as_u64().unwrap() as usize;
    let ctx = ForwardCtx::eval();
    let mut worst = 0f32;
    for case in r["models"][arch].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        let logits = m.logits(&m.forward(&row(&ids), None, None, &ctx).unwrap(), &ctx).unwrap();
        let l: Vec<Vec<f32>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(l.len(), ids.len());
        for (p, got) in l.iter().enumerate() {
            for (j, want) in case["first"][p].as_array().unwrap().iter().enumerate().take(slice) {
                worst = worst.max((got[j] - want.as_f64().unwrap() as f32).abs());
            }
            let lse = got.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let lse = lse + got.iter().map(|&x| (x - lse).exp()).sum::<f32>().ln();
            worst = worst.max((lse - case["logsumexp"][p].as_f64().unwrap() as f32).abs());
            let arg = got.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(arg as u64, case["argmax"][p].as_u64().unwrap(), "{what}: argmax at position {p}");
        }
        // Greedy decoding through the cache.
        let mut cache = KvCache::new(m.num_layers());
        let mut h = m.forward(&row(&ids), None, Some(&mut cache), &ctx).unwrap();
        let mut out = Vec::new();
        for _ in 0..case["greedy"].as_array().unwrap().len() {
            let step: Vec<f32> = m.logits(&last_position(&h).unwrap(), &ctx).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let next = step.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
            out.push(next);
            h = m.forward(&row(&[next]), None, Some(&mut cache), &ctx).unwrap();
        }
        assert_eq!(out, ids_of(&case["greedy"]), "{what}: greedy continuation of {ids:?}");
    }
    eprintln!("{what}: max |logit difference| {worst:.2e}");
    assert!(worst < 1e-4, "{what}: logits differ from transformers by {worst}");
    // PEFT's default LoRA targets for the model type attach by name, and a LoRA with B = 0
    // leaves the logits unchanged.
    let mut m = m;
    let ids = ids_of(&r["models"][arch][0]["ids"]);
    let before = m.logits(&m.forward(&row(&ids), None, None, &ctx).unwrap(), &ctx).unwrap();
    let spec = DeltaSpec::parse_cli("lora:r=4").unwrap();
    attach::attach(&mut m, std::slice::from_ref(&spec), AttachOptions { seed: 1, tokenizer: None }).unwrap();
    let mut sites: Vec<String> = attach::group_vars(&m, "lora").into_iter().map(|(site, _, _)| site).collect();
    sites.dedup();
    let want: Vec<String> = (0..2).flat_map(|l| default_lora_targets(arch).into_iter().map(move |p| format!("model.layers.{l}.{p}"))).collect();
    assert_eq!(sites, want, "{what}");
    let after = m.logits(&m.forward(&row(&ids), None, None, &ctx).unwrap(), &ctx).unwrap();
    assert_eq!((after - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{what}");
}

#[test]
fn tiny_decoders_match_transformers() {
    let r = reference();
    for arch in ARCHS {
        let m = LlamaModel::load_hf(&fixture(&format!("tiny/{arch}")), &Device::Cpu).unwrap();
        check(m, &r, arch, &format!("{arch} (safetensors)"));
    }
}

/// The same weights from GGUF files (llama.cpp's names and metadata; Mistral as architecture
/// `llama` with the query/key rows in llama.cpp's rotary order).
#[test]
fn tiny_decoders_from_gguf_match_transformers() {
    let r = reference();
    for arch in ARCHS {
        let m = LlamaModel::load_gguf(&fixture(&format!("tiny/{arch}/model.gguf")), &Device::Cpu).unwrap();
        check(m, &r, arch, &format!("{arch} (GGUF)"));
    }
}

/// Deterministic factor values of spread ~0.3 (tensor `k` of a delta).
fn pattern(dims: &[usize], k: usize) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| 0.3 * ((i * 7 + k * 13) as f32 * 0.37).sin()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Attaches LoRA `spec` (a CLI spec, group `lora`) to `m` with the deterministic factors of
/// [`pattern`], so that it changes the outputs.
fn attach_pattern_lora(m: &mut LlamaModel, spec: &str) -> DeltaSpec {
    let spec = DeltaSpec::parse_cli(spec).unwrap();
    attach::attach(m, std::slice::from_ref(&spec), AttachOptions { seed: 1, tokenizer: None }).unwrap();
    for (k, (_, _, var)) in attach::group_vars(m, "lora").into_iter().enumerate() {
        var.set(&pattern(var.dims(), k)).unwrap();
    }
    spec
}

/// Logits of one row of token ids.
fn logits_of(m: &LlamaModel, ids: &[u32]) -> Tensor {
    let ctx = ForwardCtx::eval();
    m.logits(&m.forward(&row(ids), None, None, &ctx).unwrap(), &ctx).unwrap()
}

/// Largest absolute difference.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// `merge --format gguf`: a LoRA with non-zero factors on every default target (Mistral's
/// query/key rows go back into llama.cpp's rotary order; Phi-3's fused matrices), folded into a
/// GGUF that loads back and answers like the unmerged model — exactly in the base's own F32
/// types, within f16 rounding in F16; the unmerged model in memory is unchanged.
#[test]
fn merged_gguf_matches_unmerged_lora() {
    use deltatune::artifacts::{write_merged_gguf, GgufWeights};
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["mistral", "phi3"] {
        let src = fixture(&format!("tiny/{arch}/model.gguf"));
        let mut m = LlamaModel::load_gguf(&src, &Device::Cpu).unwrap();
        let targets = if arch == "phi3" { "qkv_proj+o_proj+gate_up_proj+down_proj" } else { "q_proj+k_proj+v_proj+o_proj+up_proj" };
        attach_pattern_lora(&mut m, &format!("lora:r=4,target={targets}"));
        let ids = ids_of(&r["models"][arch][0]["ids"]);
        let base = LlamaModel::load_gguf(&src, &Device::Cpu).unwrap();
        let before = logits_of(&m, &ids);
        let moved = max_diff(&before, &logits_of(&base, &ids));
        assert!(moved > 0.1, "{arch}: the LoRA should change the logits (moved {moved})");
        // F16 rounds every weight (relative 5e-4): a bound of 2% of what the LoRA moved.
        for (w, tol) in [(GgufWeights::Base, 1e-4f32), (GgufWeights::F16, 0.02 * moved)] {
            let out = tmp.path().join(format!("{arch}-{w:?}.gguf"));
            let n = write_merged_gguf(&mut m, &src, &out, w).unwrap();
            assert!(n > 0);
            let back = LlamaModel::load_gguf(&out, &Device::Cpu).unwrap();
            let diff = max_diff(&before, &logits_of(&back, &ids));
            eprintln!("{arch} merged to GGUF {w:?}: max |logit difference| {diff:.2e} (the LoRA moved them by {moved:.2})");
            assert!(diff < tol, "{arch} {w:?}: merged GGUF differs by {diff}");
            let again = max_diff(&before, &logits_of(&m, &ids));
            assert!(again < 1e-5, "{arch}: the model in memory changed by {again}");
        }
    }
}

/// `merge` into an HF directory keeps the architecture: each tiny model with a non-zero LoRA on
/// PEFT's default targets, merged, written and reloaded from the directory alone, gives the
/// unmerged model's logits.
#[test]
fn merged_hf_directory_keeps_the_architecture() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let mut m = LlamaModel::load_hf(&fixture(&format!("tiny/{arch}")), &Device::Cpu).unwrap();
        attach_pattern_lora(&mut m, "lora:r=4");
        let ids = ids_of(&r["models"][arch][1]["ids"]);
        let before = logits_of(&m, &ids);
        let out = tmp.path().join(arch);
        deltatune::artifacts::write_merged_decoder(&mut m, &out, candle_core::DType::F32, None).unwrap();
        let back = LlamaModel::load_hf(&out, &Device::Cpu).unwrap();
        assert_eq!(back.config, m.config, "{arch}: config read back");
        let diff = max_diff(&before, &logits_of(&back, &ids));
        assert!(diff < 1e-4, "{arch}: merged HF directory differs by {diff}");
    }
}

/// `export --format gguf` for every tiny architecture (llama.cpp's `qwen2`, `qwen3`, `llama` for
/// Mistral with its rotary row order, `phi3` with the fused `attn_qkv` / `ffn_up` names): the
/// adapter file loads back onto the base with the same logits.
#[test]
fn llamacpp_adapters_round_trip_on_every_tiny_architecture() {
    use deltatune::artifacts::gguf_lora;
    use deltatune::io::gguf::GgufFile;
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let src = fixture(&format!("tiny/{arch}/model.gguf"));
        let mut m = LlamaModel::load_gguf(&src, &Device::Cpu).unwrap();
        let spec = attach_pattern_lora(&mut m, "lora:r=4,lora_alpha=8");
        let ids = ids_of(&r["models"][arch][0]["ids"]);
        let want = logits_of(&m, &ids);
        let file = tmp.path().join(format!("{arch}.gguf"));
        gguf_lora::export(&file, &m, &spec).unwrap();
        let g = GgufFile::open(&file).unwrap();
        let first = if arch == "phi3" { "blk.0.attn_qkv.weight.lora_a" } else { "blk.0.attn_q.weight.lora_a" };
        assert!(g.tensor_info(first).is_some(), "{arch}: no {first} in {:?}", g.tensor_names());
        let mut fresh = LlamaModel::load_gguf(&src, &Device::Cpu).unwrap();
        let moved = max_diff(&want, &logits_of(&fresh, &ids));
        assert!(moved > 0.1, "{arch}: the LoRA should change the logits (moved {moved})");
        deltatune::artifacts::load_delta(&file, &mut fresh, AttachOptions::default()).unwrap();
        let d = max_diff(&want, &logits_of(&fresh, &ids));
        assert!(d < 1e-4, "{arch}: logits after the adapter round trip differ by {d}");
    }
}
