//! Qwen 2 (q/k/v biases), Qwen 3 (query/key norms, head_dim ≠ hidden/heads) and Mistral (a
//! sliding window of 6 under 20-token prompts) read from HF safetensors directories, against
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

#[test]
fn tiny_decoders_match_transformers() {
    let r = reference();
    let slice = r["meta"]["slice"].as_u64().unwrap() as usize;
    for arch in ["qwen2", "qwen3", "mistral"] {
        let m = LlamaModel::load_hf(&fixture(&format!("tiny/{arch}")), &Device::Cpu).unwrap();
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
                assert_eq!(arg as u64, case["argmax"][p].as_u64().unwrap(), "{arch}: argmax at position {p}");
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
            assert_eq!(out, ids_of(&case["greedy"]), "{arch}: greedy continuation of {ids:?}");
        }
        eprintln!("{arch}: max |logit difference| {worst:.2e}");
        assert!(worst < 1e-4, "{arch}: logits differ from transformers by {worst}");
        // PEFT's default LoRA targets for the model type (q_proj, v_proj) attach by name, and a
        // LoRA with B = 0 leaves the logits unchanged.
        let mut m = m;
        let ids = ids_of(&r["models"][arch][0]["ids"]);
        let before = m.logits(&m.forward(&row(&ids), None, None, &ctx).unwrap(), &ctx).unwrap();
        let spec = DeltaSpec::parse_cli("lora:r=4").unwrap();
        attach::attach(&mut m, std::slice::from_ref(&spec), AttachOptions { seed: 1, tokenizer: None }).unwrap();
        let mut sites: Vec<String> = attach::group_vars(&m, "lora").into_iter().map(|(site, _, _)| site).collect();
        sites.dedup();
        assert_eq!(sites, ["q_proj", "v_proj", "q_proj", "v_proj"].iter().enumerate().map(|(i, p)| format!("model.layers.{}.self_attn.{p}", i / 2)).collect::<Vec<_>>(), "{arch}");
        let after = m.logits(&m.forward(&row(&ids), None, None, &ctx).unwrap(), &ctx).unwrap();
        assert_eq!((after - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{arch}");
    }
}
