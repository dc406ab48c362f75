//! AdaLoRA's rank allocator: a replay of PEFT's `RankAllocator` trace (budgets, EMA state, triplet
//! scores, rank patterns and masked `lora_E`, step by step), PEFT's refusals of bad schedules,
//! and real training runs whose allocator prunes to the budget and whose export PEFT can load.

use crate::common::*;
use candle_core::{Tensor, Var};
use deltatune::artifacts::{delta_dir as store, peft, TaskModel};
use deltatune::attach::{self, AttachOptions};
use deltatune::core::{GroupTensors, GroupTrainer};
use deltatune::data::tokenize::Encoding;
use deltatune::delta::{AdaLoraConfig, DeltaConfig, DeltaSpec};
use deltatune::head::{Head, HeadConfig, HeadKind};
use deltatune::io::TensorFile;
use deltatune::train::{fit, FitOptions, Prepared, Scores, TrainConfig};
use deltatune::{BertModel, Pooling};
use serde_json::Value;
use std::collections::BTreeMap;

fn trace() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("peft/adalora_allocator_trace.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn rel_close(mine: &[f32], theirs: &[f32], what: &str) -> f64 {
    assert_eq!(mine.len(), theirs.len(), "{what}: length");
    let mut worst = 0f64;
    for (a, b) in mine.iter().zip(theirs) {
        let rel = (*a as f64 - *b as f64).abs() / (b.abs() as f64).max(1e-12);
        // Values near float32 rounding of zero compare absolutely.
        let bad = rel > 1e-4 && (*a as f64 - *b as f64).abs() > 1e-9;
        assert!(!bad, "{what}: {a} vs {b} (rel {rel:e})");
        if (*a as f64 - *b as f64).abs() > 1e-9 {
            worst = worst.max(rel);
        }
    }
    worst
}

#[test]
fn allocator_replays_peft_trace() {
    let doc = trace();
    let c = &doc["config"];
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let cfg = AdaLoraConfig {
        init_r: u("init_r"),
        target_r: u("target_r"),
        lora_alpha: c["lora_alpha"].as_f64().unwrap(),
        tinit: u("tinit"),
        tfinal: u("tfinal"),
        delta_t: u("deltaT"),
        beta1: c["beta1"].as_f64().unwrap(),
        beta2: c["beta2"].as_f64().unwrap(),
        total_step: Some(u("total_step")),
        ..Default::default()
    };
    let total = u("total_step");
    let steps = doc["steps"].as_array().unwrap();
    let mods = ["lin0", "lin1", "lin2"];
    // The group: Vars shaped like the toy model's, a full rank_mask buffer per module.
    let mut g = GroupTensors { name: "g".into(), ..Default::default() };
    let mut vars: BTreeMap<String, Var> = BTreeMap::new();
    for m in mods {
        for p in ["lora_A", "lora_E", "lora_B"] {
            let shape: Vec<usize> = steps[0]["params"][format!("{m}.{p}.default")]["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let v = Var::zeros(shape, candle_core::DType::F32, &cpu()).unwrap();
            g.trainable.push((m.into(), p.into(), v.clone()));
            vars.insert(format!("{m}.{p}"), v);
        }
        let mask = Var::from_tensor(&Tensor::ones((cfg.init_r, 1), candle_core::DType::F32, &cpu()).unwrap()).unwrap();
        g.buffers.push((m.into(), "rank_mask".into(), mask));
    }
    let mut alloc = cfg.allocator(g).unwrap();
    assert_eq!(alloc.budgets(), (doc["init_bgt"].as_u64().unwrap() as usize, doc["target_bgt"].as_u64().unwrap() as usize));
    let (mut worst, mut maskings) = (0f64, 0);
    for rec in steps {
        let t = rec["step"].as_u64().unwrap() as usize;
        let mut grads = BTreeMap::new();
        for (name, v) in &vars {
            let peft_name = format!("{name}.default");
            let p = &rec["params"][&peft_name];
            v.set(&Tensor::from_vec(floats(&p["value"]), v.dims(), &cpu()).unwrap()).unwrap();
            grads.insert(format!("g.{name}"), Tensor::from_vec(floats(&rec["grads"][&peft_name]), v.dims(), &cpu()).unwrap());
        }
        alloc.after_step(t + 1, total, &grads).unwrap();
        let last = alloc.last_step().clone();
        let bs = &rec["budget_schedule"];
        assert_eq!((last.budget, last.mask_ind), (bs["budget"].as_u64().unwrap() as usize, bs["mask_ind"].as_bool().unwrap()), "step {t}: budget schedule");
        assert_eq!(alloc.budget_schedule(t, total), (last.budget, last.mask_ind));
        // EMA sensitivity and uncertainty (dropped at total_step - tfinal).
        match rec["exp_avg_ipt"].as_object() {
            None => assert!(alloc.ema("g.lin0.lora_A").is_none(), "step {t}: EMA state should be reset"),
            Some(ipt) => {
                for (name, theirs) in ipt {
                    let key = format!("g.{}", name.trim_end_matches(".default"));
                    let (e, u) = alloc.ema(&key).unwrap_or_else(|| panic!("step {t}: no EMA for {key}"));
                    worst = worst.max(rel_close(&e.flatten_all().unwrap().to_vec1().unwrap(), &floats(theirs), &format!("step {t} ipt {key}")));
                    worst = worst.max(rel_close(&u.flatten_all().unwrap().to_vec1().unwrap(), &floats(&rec["exp_avg_unc"][name]), &format!("step {t} unc {key}")));
                }
            }
        }
        // Triplet scores and the budget of a masking step.
        match rec.get("triplet_scores") {
            Some(ts) => {
                maskings += 1;
                assert_eq!(last.mask_budget, Some(rec["mask_budget"].as_u64().unwrap() as usize), "step {t}: mask budget");
                let scores = last.scores.as_ref().unwrap_or_else(|| panic!("step {t}: PEFT masked, we did not"));
                for m in mods {
                    worst = worst.max(rel_close(&scores[m], &floats(&ts[format!("{m}.lora_E.default")]), &format!("step {t} scores {m}")));
                }
            }
            None => assert!(last.scores.is_none(), "step {t}: we masked, PEFT did not"),
        }
        // Rank pattern (null before the first masking: all kept).
        let pattern = alloc.pattern().unwrap();
        for m in mods {
            let theirs: Vec<bool> = match rec["rank_pattern"].as_object() {
                Some(p) => p[&format!("{m}.lora_E.default")].as_array().unwrap().iter().map(|b| b.as_bool().unwrap()).collect(),
                None => vec![true; cfg.init_r],
            };
            assert_eq!(pattern[m], theirs, "step {t}: rank pattern of {m}");
            let e: Vec<f32> = vars[&format!("{m}.lora_E")].flatten_all().unwrap().to_vec1().unwrap();
            let want = floats(&rec["lora_E_after"][format!("{m}.lora_E.default")]);
            assert_eq!(e, want, "step {t}: lora_E of {m} after masking");
        }
    }
    assert_eq!(maskings, 3);
    eprintln!("allocator trace: {} steps, budgets/patterns/masked E equal, EMA and scores max rel diff {worst:.2e}", steps.len());
}

#[test]
fn schedule_is_cubic_between_tinit_and_tfinal() {
    // init 4 modules × 12 = 48, target 4 × 8 = 32, tinit 10, tfinal 20, total 110.
    let cfg = AdaLoraConfig { tinit: 10, tfinal: 20, delta_t: 5, total_step: Some(110), ..Default::default() };
    let mut g = GroupTensors { name: "g".into(), ..Default::default() };
    for i in 0..4 {
        let site = format!("s{i}");
        for (p, shape) in [("lora_A", (12, 6)), ("lora_E", (12, 1)), ("lora_B", (5, 12))] {
            g.trainable.push((site.clone(), p.into(), Var::zeros(shape, candle_core::DType::F32, &cpu()).unwrap()));
        }
        g.buffers.push((site, "rank_mask".into(), Var::from_tensor(&Tensor::ones((12, 1), candle_core::DType::F32, &cpu()).unwrap()).unwrap()));
    }
    let a = cfg.allocator(g).unwrap();
    assert_eq!(a.budgets(), (48, 32));
    assert_eq!(a.budget_schedule(0, 110), (48, false));
    assert_eq!(a.budget_schedule(10, 110), (48, false));
    for t in 11..=90 {
        let mul = 1.0 - (t - 10) as f64 / 80.0;
        let want = (16.0 * mul * mul * mul + 32.0) as usize;
        assert_eq!(a.budget_schedule(t, 110), (want, t % 5 == 0), "step {t}");
    }
    assert_eq!(a.budget_schedule(90, 110).0, 32);
    assert_eq!(a.budget_schedule(91, 110), (32, true));
    assert_eq!(a.budget_schedule(109, 110), (32, true));
}

#[test]
fn bad_values_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let cases = [
        ("adalora:tinit=5,tfinal=5,total_step=10", "tinit (5) + tfinal (5) must be below total_step (10)"),
        ("adalora:total_step=0", "total_step must be at least 1"),
        ("adalora:init_r=4,target_r=6", "target_r must be between 1 and init_r (4), got 6"),
        ("adalora:target_r=0", "target_r must be between 1"),
        ("adalora:init_r=0", "init_r must be at least 1"),
        ("adalora:orth_reg_weight=0", "orth_reg_weight must be greater than 0"),
        ("adalora:beta1=1", "beta1 must be in (0, 1)"),
        ("adalora:beta2=0", "beta2 must be in (0, 1)"),
        ("adalora:deltaT=0", "deltaT must be at least 1"),
        ("adalora:lora_dropout=1", "lora_dropout 1 is not in [0, 1)"),
    ];
    for (spec, want) in cases {
        let s = DeltaSpec::parse_cli(spec).unwrap();
        let mut model = BertModel::load(&dir, &cpu()).unwrap();
        let e = attach::attach(&mut model, &[s], AttachOptions::default()).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("adalora"), "{spec}: {e}");
    }
    // total_step from the run: a run too short for tinit + tfinal is refused naming both.
    let mut c = DeltaConfig::AdaLora(AdaLoraConfig { tinit: 3, tfinal: 2, ..Default::default() });
    let e = c.set_run_length(5).unwrap_err().to_string();
    assert!(e.contains("tinit (3) + tfinal (2) must be below total_step (5)"), "{e}");
    c.set_run_length(6).unwrap();
    assert!(matches!(&c, DeltaConfig::AdaLora(a) if a.total_step == Some(6)));
    // A given total_step is kept.
    let mut c = DeltaConfig::AdaLora(AdaLoraConfig { total_step: Some(40), ..Default::default() });
    c.set_run_length(7).unwrap();
    assert!(matches!(&c, DeltaConfig::AdaLora(a) if a.total_step == Some(40)));
    // Short keys resolve.
    let s = DeltaSpec::parse_cli("adalora:alpha=16,delta_t=10,target_r=4").unwrap();
    assert!(matches!(&s.config, DeltaConfig::AdaLora(a) if a.lora_alpha == 16.0 && a.delta_t == 10 && a.target_r == 4));
}

#[test]
fn peft_configs_peft_refuses_are_refused() {
    let Some(dir) = model_dir() else { return };
    let src = fixture("peft/adalora");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    let cases: &[(&str, Value, &str)] = &[
        ("total_step", Value::Null, "total_step"),
        ("tinit", 5.into(), "tinit (5) + tfinal (2) must be below total_step (6)"),
        ("use_dora", true.into(), "DoRA"),
        ("orth_reg_weight", 0.into(), "orth_reg_weight"),
        ("rank_pattern", serde_json::json!({"encoder.layer.0.attention.self.query.lora_E": [true, false]}), "has 2 entries, init_r is 4"),
    ];
    for (key, value, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = base.clone();
        cfg[*key] = value.clone();
        std::fs::write(tmp.path().join("adapter_config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        std::fs::copy(src.join("adapter_model.safetensors"), tmp.path().join("adapter_model.safetensors")).unwrap();
        let mut model = BertModel::load(&dir, &cpu()).unwrap();
        let e = peft::load(tmp.path(), &mut model, None).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("adapter_config.json"), "{key}: {e}");
    }
}

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

fn mean_loss(model: &TaskModel, d: &Prepared) -> f32 {
    let idx: Vec<usize> = (0..d.len()).collect();
    let (batch, targets) = d.batch(&idx, model.head.config.kind, 0, &cpu()).unwrap();
    let logits = model.logits(&batch, &deltatune::ForwardCtx::eval()).unwrap();
    model.head.loss(&logits, &targets).unwrap().to_scalar::<f32>().unwrap()
}

/// A real training run: the allocator runs inside `fit`, prunes to `target_r × modules`, the loss
/// falls, the report states the budget, and the saved delta exports a trimmed PEFT folder that
/// loads back to the same outputs.
#[test]
fn training_prunes_to_the_budget_and_exports_trimmed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let mut backbone = BertModel::load(&dir, &cpu()).unwrap();
    let mut spec = DeltaSpec::parse_cli("adalora:init_r=4,target_r=2,lora_alpha=8,tinit=2,tfinal=3,deltaT=2").unwrap();
    let cfg = TrainConfig { lr: 1e-2, epochs: 3, batch_size: 4, checkpoint_every: 1000, ..Default::default() };
    let (tr, dv) = (data(24), data(8));
    let total = deltatune::train::fit::total_steps(&cfg, tr.len());
    assert_eq!(total, 18);
    spec.config.set_run_length(total).unwrap();
    attach::attach(&mut backbone, std::slice::from_ref(&spec), AttachOptions { seed: 3, tokenizer: None }).unwrap();
    let modules = attach::group_tensors(&backbone, &spec.name).trainable.len() / 3;
    assert_eq!(modules, 4); // query, value in 2 layers
    let head = Head::new(HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: Pooling::Mean, hidden_size: 8 }, 3, &cpu()).unwrap();
    let mut model = TaskModel { backbone, head, specs: vec![spec.clone()] };
    let before = mean_loss(&model, &tr);
    let run = tmp.path().join("run");
    let res = fit(&mut model, FitOptions { cfg: &cfg, train: &tr, dev: Some(&dv), scorer: &acc, run_dir: &run, final_dir: &run, resume: false, ctl: &deltatune::api::Control::silent(), meta: Default::default(), pad_id: 0 }).unwrap();
    let after = mean_loss(&model, &tr);
    assert!(after < before, "loss {before} -> {after}");
    // The final pattern keeps at most target_r × modules ranks, and pruned E are zero.
    let g = attach::group_tensors(&model.backbone, &spec.name);
    let mut kept = 0;
    for (site, _, mask) in &g.buffers {
        let m: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        let e = g.trainable.iter().find(|(s, p, _)| s == site && p == "lora_E").unwrap().2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (mi, ei) in m.iter().zip(&e) {
            if *mi == 0.0 {
                assert_eq!(*ei, 0.0, "{site}: a pruned rank still has a singular value");
            }
        }
        kept += m.iter().filter(|x| **x == 1.0).count();
    }
    assert!(kept <= 2 * modules && kept > 0, "kept {kept} ranks for a budget of {}", 2 * modules);
    let report = res.reports.join("\n");
    assert!(report.contains(&format!("{kept} of 16 ranks kept over 4 modules (target 8 = target_r 2 × 4)")), "{report}");
    eprintln!("tiny AdaLoRA run: loss {before:.4} -> {after:.4}; {report}");
    // The saved final delta carries total_step and the pattern; its PEFT export is trimmed.
    let final_dir = run.join("final");
    let mut again = BertModel::load(&dir, &cpu()).unwrap();
    let loaded = store::load(&final_dir, &mut again, AttachOptions::default()).unwrap();
    assert!(matches!(&loaded.specs[0].config, DeltaConfig::AdaLora(a) if a.total_step == Some(18)));
    let out = tmp.path().join("peft");
    peft::export(&out, &again, &loaded.specs[0], "tiny", &Default::default()).unwrap();
    let cfg_json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    let pattern = cfg_json["rank_pattern"].as_object().expect("a rank pattern after training");
    assert_eq!(pattern.len(), 4);
    assert_eq!(cfg_json["total_step"], 18);
    let f = TensorFile::load(&out.join("adapter_model.safetensors"), &cpu()).unwrap();
    let mut saved_kept = 0;
    for (k, bits) in pattern {
        let n = bits.as_array().unwrap().iter().filter(|b| b.as_bool().unwrap()).count();
        let site = k.trim_end_matches(".lora_E");
        assert_eq!(f.get(&format!("base_model.model.{site}.lora_A")).unwrap().dims()[0], n);
        assert_eq!(f.get(&format!("base_model.model.{site}.lora_B")).unwrap().dims()[1], n);
        saved_kept += n;
    }
    assert_eq!(saved_kept, kept);
    assert!(f.names().all(|k| !k.contains("rank_mask")));
    // Re-import gives the same outputs.
    let mut back = BertModel::load(&dir, &cpu()).unwrap();
    peft::load(&out, &mut back, None).unwrap();
    let batch = tiny_batch();
    let a = deltatune::Backbone::forward(&again, &batch, &deltatune::ForwardCtx::eval()).unwrap().last_hidden_state;
    let b = deltatune::Backbone::forward(&back, &batch, &deltatune::ForwardCtx::eval()).unwrap().last_hidden_state;
    assert!(max_diff(&a, &b) <= 1e-6, "re-imported export differs by {}", max_diff(&a, &b));
}
