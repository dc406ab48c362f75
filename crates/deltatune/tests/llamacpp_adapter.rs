//! llama.cpp LoRA adapter GGUFs: a LoRA exported by `export --format gguf` and loaded back with
//! `--delta adapter.gguf` gives the same logits (SmolLM2: Llama, whose query/key rows llama.cpp
//! stores in its rotary order; Gemma 3 when installed), and the file has llama.cpp's keys,
//! names and shapes; bad adapter files are errors naming the problem.

use crate::common::decoder_file;
use candle_core::{Device, Tensor};
use deltatune::artifacts::gguf_lora;
use deltatune::attach::{self, AttachOptions};
use deltatune::backbone::llama::LlamaModel;
use deltatune::delta::DeltaSpec;
use deltatune::io::gguf::GgufFile;
use deltatune::ForwardCtx;
use std::path::Path;

fn logits(m: &LlamaModel, ids: &[u32]) -> Tensor {
    let t = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let ctx = ForwardCtx::eval();
    m.logits(&m.forward(&t, None, None, &ctx).unwrap(), &ctx).unwrap()
}

fn round_trip(base: &Path, arch: &str) {
    let mut m = LlamaModel::load(base, &Device::Cpu).unwrap();
    m.set_exact(true);
    let spec = DeltaSpec::parse_cli("lora:r=4,lora_alpha=8,target=q_proj+k_proj+v_proj+o_proj+down_proj").unwrap();
    attach::attach(&mut m, std::slice::from_ref(&spec), AttachOptions::default()).unwrap();
    // Non-zero B (a fresh LoRA is the identity), deterministic.
    for (n, (_, param, var)) in attach::group_vars(&m, &spec.name).into_iter().enumerate() {
        let dims = var.dims().to_vec();
        let count: usize = dims.iter().product();
        let scale = if param.starts_with("lora_B") { 0.02 } else { 0.05 };
        let v: Vec<f32> = (0..count).map(|i| scale * ((i as f32) * 0.37 + n as f32).sin()).collect();
        var.set(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap();
    }
    let ids = [1u32, 504, 3458, 282, 4649, 314];
    let want = logits(&m, &ids);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("adapter.gguf");
    gguf_lora::export(&file, &m, &spec).unwrap();

    let g = GgufFile::open(&file).unwrap();
    assert_eq!(g.string("general.type").unwrap(), "adapter");
    assert_eq!(g.string("adapter.type").unwrap(), "lora");
    assert_eq!(g.string("general.architecture").unwrap(), arch);
    assert_eq!(g.f64_opt("adapter.lora.alpha").unwrap(), Some(8.0));
    let (a_dims, _) = g.tensor_info("blk.0.attn_q.weight.lora_a").unwrap();
    let (b_dims, _) = g.tensor_info("blk.0.attn_q.weight.lora_b").unwrap();
    let (q_dims, _) = {
        let base_g = GgufFile::open(base).unwrap();
        base_g.tensor_info("blk.0.attn_q.weight").unwrap()
    };
    assert_eq!((a_dims[0], a_dims[1]), (4, q_dims[1]), "lora_a is r x in");
    assert_eq!((b_dims[0], b_dims[1]), (q_dims[0], 4), "lora_b is out x r");
    assert!(g.tensor_info("blk.3.ffn_down.weight.lora_b").is_some());

    let mut fresh = LlamaModel::load(base, &Device::Cpu).unwrap();
    fresh.set_exact(true);
    let before = logits(&fresh, &ids);
    let loaded = deltatune::artifacts::load_delta(&file, &mut fresh, AttachOptions::default()).unwrap();
    assert_eq!(loaded.specs.len(), 1);
    let got = logits(&fresh, &ids);
    let d = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let moved = (&before - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 1e-2, "the LoRA changes the logits ({moved})");
    assert!(d < 1e-4, "{arch}: logits after the adapter round trip differ by {d}");
}

#[test]
fn smollm2_lora_round_trips_through_a_llamacpp_adapter() {
    let Some(f) = decoder_file() else { return };
    round_trip(&f, "llama");
}

#[test]
fn gemma3_lora_round_trips_through_a_llamacpp_adapter() {
    let Some(f) = crate::common::gemma3_file() else {
        return;
    };
    round_trip(&f, "gemma3");
}

#[test]
fn bad_adapter_files_are_clear_errors() {
    let Some(f) = decoder_file() else { return };
    let mut m = LlamaModel::load(&f, &Device::Cpu).unwrap();
    // The base model itself is a GGUF but not an adapter.
    let e = gguf_lora::load(&f, &mut m).unwrap_err().to_string();
    assert!(e.contains("not a llama.cpp LoRA adapter"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf").unwrap();
    let e = gguf_lora::load(&junk, &mut m).unwrap_err().to_string();
    assert!(e.contains("junk.gguf"), "{e}");
}
