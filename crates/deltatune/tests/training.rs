//! Training maths against PyTorch (../shared/golden/lora_grad.safetensors, made by
//! tools/make_goldens.py there): with the recorded head, inputs and LoRA, the loss and every
//! gradient match within 1e-4 relative, and three AdamW steps reproduce the recorded losses.

use crate::common::*;
use crate::require_model;
use candle_core::{DType, Tensor};
use deltatune::attach::{self, AttachOptions};
use deltatune::delta::DeltaSpec;
use deltatune::head::{Head, HeadConfig, HeadKind};
use deltatune::io::TensorFile;
use deltatune::train::optim::{AdamW, AdamWConfig, DecayRule};
use deltatune::{Backbone, BertModel, ForwardCtx, Pooling};
use std::collections::BTreeMap;

fn golden_name(ours: &str) -> String {
    match ours.strip_prefix("lora.") {
        Some(rest) => format!("base_model.model.{rest}"),
        None => ours.to_string(),
    }
}

#[test]
fn lora_gradients_and_adamw_steps_match_pytorch() {
    let dir = require_model!();
    let Some(path) = golden("lora_grad.safetensors") else { return };
    let g = TensorFile::load(&path, &cpu()).unwrap();
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    let spec = DeltaSpec::parse_cli("lora:r=8,lora_alpha=16,target=query+value").unwrap();
    attach::attach(&mut model, &[spec], AttachOptions::default()).unwrap();
    let mut params = attach::trainable_vars(&model);
    for (name, v) in &params {
        v.set(g.get(&format!("init.{}", golden_name(name))).unwrap()).unwrap();
    }
    let head_cfg = HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: Pooling::Mean, hidden_size: 384 };
    let tensors: BTreeMap<String, Tensor> =
        ["head.weight", "head.bias"].iter().map(|k| (k.to_string(), g.get(&format!("init.{k}")).unwrap().clone())).collect();
    let head = Head::from_tensors(head_cfg, &tensors, "lora_grad.safetensors").unwrap();
    params.extend(head.params());
    assert_eq!(params.len(), 26);
    let batch = batch_from(g.get("input_ids").unwrap(), Some(g.get("token_type_ids").unwrap()), g.get("attention_mask").unwrap());
    let labels = g.get("labels").unwrap().to_dtype(DType::U32).unwrap();
    let forward = |model: &BertModel| {
        let out = model.forward(&batch, &ForwardCtx::eval()).unwrap();
        let logits = head.forward(&out).unwrap();
        let loss = head.loss(&logits, &labels).unwrap();
        (logits, loss)
    };
    let (logits, loss) = forward(&model);
    let l = loss.to_scalar::<f32>().unwrap();
    let gl = g.get("loss").unwrap().to_scalar::<f32>().unwrap();
    assert!((l - gl).abs() <= 1e-4 * gl.abs(), "loss {l} vs {gl}");
    assert!(max_diff(&logits, g.get("logits").unwrap()) <= 1e-5);
    let grads = loss.backward().unwrap();
    for (name, v) in &params {
        let ours = grads.get(v).unwrap();
        let theirs = g.get(&format!("grad.{}", golden_name(name))).unwrap();
        let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let d = max_diff(ours, theirs);
        assert!(d <= 1e-4 * scale || d <= 1e-5, "grad {name}: {d:e} (scale {scale:e})");
    }
    // Three AdamW steps (lr 1e-3, wd 0.01 on every tensor, as in the generator).
    let cfg = AdamWConfig { weight_decay: 0.01, decay_rule: DecayRule::All, ..Default::default() };
    let mut opt = AdamW::new(params.clone(), cfg).unwrap();
    let losses = g.get("losses").unwrap().to_vec1::<f32>().unwrap();
    let mut ours_losses = vec![l];
    for _ in 0..3 {
        let (_, loss) = forward(&model);
        let grads = loss.backward().unwrap();
        let map: BTreeMap<String, Tensor> = params.iter().map(|(n, v)| (n.clone(), grads.get(v).unwrap().clone())).collect();
        opt.step(&map, 1e-3).unwrap();
        ours_losses.push(forward(&model).1.to_scalar::<f32>().unwrap());
    }
    for (a, b) in ours_losses.iter().zip(&losses) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "losses {ours_losses:?} vs {losses:?}");
    }
    for (name, v) in &params {
        let d = max_diff(v.as_tensor(), g.get(&format!("step3.{}", golden_name(name))).unwrap());
        assert!(d <= 5e-5, "step3 {name}: {d:e}");
    }
    let d = max_diff(&forward(&model).0, g.get("step3.logits").unwrap());
    assert!(d <= 1e-4, "step3 logits {d:e}");
}

mod frozen_cache {
    use crate::common::*;
    use deltatune::attach::{self, AttachOptions};
    use deltatune::data::tokenize::Encoding;
    use deltatune::delta::DeltaSpec;
    use deltatune::head::{Head, HeadConfig, HeadKind};
    use deltatune::train::{fit, FitOptions, Prepared, Scores, TrainConfig};
    use deltatune::artifacts::TaskModel;
    use deltatune::{BertModel, Pooling};

    fn data(n: usize) -> Prepared {
        let mut p = Prepared::default();
        for i in 0..n {
            let len = 3 + i % 5;
            let ids: Vec<u32> = (0..len).map(|j| 2 + ((i * 7 + j * 3) % 27) as u32).collect();
            p.encodings.push(Encoding { token_type_ids: vec![0; len], input_ids: ids });
            p.targets.push((i % 2) as f32);
        }
        p
    }

    fn acc(p: &[f32], g: &[f32]) -> deltatune::Result<Scores> {
        let a = p.iter().zip(g).filter(|(x, y)| x == y).count() as f64 / g.len() as f64;
        Ok(Scores { primary: "accuracy".into(), values: [("accuracy".to_string(), a)].into() })
    }

    /// Trains a LoRA on the top layer of the tiny model and returns the final parameters.
    fn train(dir: &std::path::Path, run: &std::path::Path, cache: bool, cache_mb: usize) -> Vec<Vec<f32>> {
        let mut backbone = BertModel::load(dir, &cpu()).unwrap();
        let spec = DeltaSpec::parse_cli("lora:r=2,lora_alpha=4,target=query+value+dense,layers=1").unwrap();
        attach::attach(&mut backbone, std::slice::from_ref(&spec), AttachOptions { seed: 3, tokenizer: None }).unwrap();
        assert_eq!(attach::frozen_prefix_layers(&backbone), 1);
        let head = Head::new(HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: Pooling::Mean, hidden_size: 8 }, 3, &cpu()).unwrap();
        let mut model = TaskModel { backbone, head, specs: vec![spec] };
        let cfg = TrainConfig {
            lr: 1e-2,
            epochs: 2,
            batch_size: 4,
            cache_frozen: cache,
            frozen_prefix_dropout: false,
            cache_mb,
            checkpoint_every: 1000,
            ..Default::default()
        };
        let (tr, dv) = (data(24), data(8));
        fit(&mut model, FitOptions { cfg: &cfg, train: &tr, dev: Some(&dv), scorer: &acc, run_dir: run, final_dir: run, resume: false, ctl: &deltatune::api::Control::silent(), meta: Default::default(), pad_id: 0 }).unwrap();
        model.params().iter().map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    }

    #[test]
    fn cached_training_equals_uncached() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_tiny_model(&tmp.path().join("m"), |_| {});
        let plain = train(&dir, &tmp.path().join("a"), false, 2048);
        let cached = train(&dir, &tmp.path().join("b"), true, 2048);
        let spilled = train(&dir, &tmp.path().join("c"), true, 0);
        // Equal up to float summation order (the cache is built on differently padded batches,
        // which changes the order of additions of exact zeros' neighbours in the attention gemm).
        let worst = |a: &Vec<Vec<f32>>, b: &Vec<Vec<f32>>| -> f32 {
            a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
        };
        assert!(worst(&plain, &cached) <= 1e-5, "cached run differs from the uncached one by {}", worst(&plain, &cached));
        assert_eq!(cached, spilled, "the on-disk cache must give exactly the in-memory result");
        assert!(!tmp.path().join("c/frozen-cache.bin").exists(), "the spill file is removed after training");
    }
}
