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

/// Data-parallel training with ranks as threads (`dist::threads`, the same code path as MPI
/// ranks): 2 and 3 ranks end with the one-process deltas, with dropout on, gradient
/// accumulation, uneven shards and the frozen-prefix cache.
mod data_parallel {
    use crate::common::*;
    use deltatune::api::Control;
    use deltatune::artifacts::TaskModel;
    use deltatune::attach::{self, AttachOptions};
    use deltatune::data::tokenize::Encoding;
    use deltatune::delta::DeltaSpec;
    use deltatune::dist::{threads, Collective};
    use deltatune::head::{Head, HeadConfig, HeadKind};
    use deltatune::train::{fit, FitOptions, Prepared, Scores, TrainConfig};
    use deltatune::{BertModel, Pooling};
    use std::path::Path;

    fn data(n: usize, salt: usize) -> Prepared {
        let mut p = Prepared::default();
        for i in 0..n {
            let len = 3 + (i + salt) % 6;
            let ids: Vec<u32> = (0..len).map(|j| 2 + ((i * 5 + j * 7 + salt) % 27) as u32).collect();
            p.encodings.push(Encoding { token_type_ids: vec![0; len], input_ids: ids });
            p.targets.push(((i + salt) % 3 == 0) as u32 as f32);
        }
        p
    }

    fn acc(p: &[f32], g: &[f32]) -> deltatune::Result<Scores> {
        let a = p.iter().zip(g).filter(|(x, y)| x == y).count() as f64 / g.len() as f64;
        Ok(Scores { primary: "accuracy".into(), values: [("accuracy".to_string(), a)].into() })
    }

    /// Trains LoRA + LN tuning + adapters on the tiny model (dropout 0.1 everywhere) and returns the final
    /// parameters and the losses rank 0 logged.
    fn train(dir: &Path, run: &Path, world: Option<&dyn Collective>, cache: bool) -> (Vec<Vec<f32>>, Vec<f64>) {
        let mut backbone = BertModel::load(dir, &cpu()).unwrap();
        let layers = if cache { ",layers=1" } else { "" };
        let specs = vec![
            DeltaSpec::parse_cli(&format!("lora:r=2,lora_alpha=4,lora_dropout=0.1,target=query+value{layers}")).unwrap(),
            // (Not BitFit: the key bias's gradient is zero in exact arithmetic, so AdamW turns
            // its rounding noise into updates of ±lr that differ with any summation order.)
            DeltaSpec::parse_cli("ln_tuning").unwrap(),
            // An adapter after each sublayer: the engine drops the sublayer's output before it in
            // the forward and again in the backward, which a rank runs outside its rows' scope.
            DeltaSpec::parse_cli("houlsby:init_weights=bert").unwrap(),
        ];
        let specs = if cache { specs[..1].to_vec() } else { specs };
        attach::attach(&mut backbone, &specs, AttachOptions { seed: 5, tokenizer: None }).unwrap();
        let head = Head::new(HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: Pooling::Mean, hidden_size: 8 }, 5, &cpu()).unwrap();
        let mut model = TaskModel { backbone, head, specs };
        let cfg = TrainConfig {
            lr: 1e-2,
            epochs: 2,
            batch_size: 7,
            grad_accum: 2,
            cache_frozen: cache,
            checkpoint_every: 3,
            eval_every: Some(4),
            ..Default::default()
        };
        let (tr, dv) = (data(38, 0), data(9, 1));
        let ctl = Control::silent();
        let ctl = match world {
            Some(w) => ctl.with_world(w),
            None => ctl,
        };
        let r = fit(&mut model, FitOptions { cfg: &cfg, train: &tr, dev: Some(&dv), scorer: &acc, run_dir: run, final_dir: run, resume: false, ctl: &ctl, meta: Default::default(), pad_id: 0 }).unwrap();
        assert_eq!(r.ranks, world.map_or(1, |w| w.size()));
        let losses = if world.is_none_or(|w| w.rank() == 0) {
            std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v["kind"] == "train")
                .map(|v| v["loss"].as_f64().unwrap())
                .collect()
        } else {
            Vec::new()
        };
        (model.params().iter().map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect(), losses)
    }

    fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn ranks_end_with_the_one_process_deltas() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_tiny_model(&tmp.path().join("m"), |_| {});
        for cache in [false, true] {
            let solo_dir = tmp.path().join(format!("solo-{cache}"));
            let (solo, solo_losses) = train(&dir, &solo_dir, None, cache);
            assert_eq!(solo_losses.len(), 6, "2 epochs of 3 steps (38 examples, 7 × 2 per step)");
            for n in [2, 3] {
                let run = tmp.path().join(format!("dp{n}-{cache}"));
                let out = threads::run(n, |w| train(&dir, &run, Some(w), cache));
                for (r, (params, _)) in out.iter().enumerate() {
                    let d = worst(&solo, params);
                    assert!(d <= 1e-6, "{n} ranks (cache {cache}), rank {r}: deltas differ from one process by {d}");
                    assert_eq!(params, &out[0].0, "every rank holds the same deltas");
                }
                for (a, b) in solo_losses.iter().zip(&out[0].1) {
                    assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "losses {solo_losses:?} vs {:?}", out[0].1);
                }
                // Rank 0 wrote the run; nothing else appeared (no stray spill files).
                assert!(run.join("final/delta.safetensors").is_file());
                assert!(!run.join("frozen-cache.bin").exists());
            }
        }
        // A world of one rank takes the one-process path.
        let (a, _) = train(&dir, &tmp.path().join("x"), None, false);
        let out = threads::run(1, |w| train(&dir, &tmp.path().join("y"), Some(w), false));
        assert_eq!(worst(&a, &out[0].0), 0.0, "a world of one rank is the one-process run exactly");
    }
}
