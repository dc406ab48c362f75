//! One table of method cases drives the common checks (a new method gets them by adding a row):
//! attach, identity at initialisation where the method has one, a real change once trained,
//! gradients that reach exactly the delta tensors, a gradient step that lowers the loss,
//! bit-exact save → load, and merge == unmerged for mergeable methods. Each row runs on a tiny
//! random BERT and again, with default hyperparameters, on the real default model.

use crate::common::*;
use candle_core::{DType, Tensor, Var};
use deltatune::attach::{self, AttachOptions};
use deltatune::artifacts::delta_dir as store;
use deltatune::core::init::Stream;
use deltatune::delta::DeltaSpec;
use deltatune::{Backbone, BertModel, EncodedBatch, ForwardCtx, Pooling};

struct Row {
    /// CLI spec for the tiny model (hidden 8, 2 layers).
    tiny: &'static str,
    /// CLI spec for the real model (defaults).
    real: &'static str,
    /// A fresh delta leaves outputs unchanged.
    identity: bool,
    mergeable: bool,
}

const ROWS: &[Row] = &[
    Row { tiny: "lora:r=2,lora_alpha=5", real: "lora", identity: true, mergeable: true },
    Row { tiny: "lora:r=3,lora_alpha=2,use_rslora=true,target=query+key+value+dense,layers=1,name=lora_all", real: "lora:r=8,lora_alpha=16,target=query+value", identity: true, mergeable: true },
    Row { tiny: "dora:r=2,lora_alpha=5", real: "dora", identity: true, mergeable: true },
    Row { tiny: "lora:use_dora=true,r=3,init_lora_weights=random,lora_dropout=0.1,target=query+key+value+dense,layers=1,name=dora_all", real: "dora:r=8,lora_alpha=16", identity: false, mergeable: true },
    Row { tiny: "ia3", real: "ia3", identity: true, mergeable: true },
    Row { tiny: "vera:r=4,d_initial=0.5", real: "vera", identity: true, mergeable: true },
    Row { tiny: "vera:r=3,target=query+intermediate.dense+output.dense,save_projection=false,vera_dropout=0.1,name=vera_all", real: "vera:r=16,target=query+intermediate.dense,projection_prng_key=3", identity: true, mergeable: true },
    Row { tiny: "adapter:init_weights=mam_adapter,bottleneck_size=3", real: "adapter", identity: false, mergeable: false },
    Row { tiny: "houlsby:bottleneck_size=3,init_weights=mam_adapter", real: "houlsby:init_weights=mam_adapter", identity: true, mergeable: false },
    Row { tiny: "parallel_adapter", real: "parallel_adapter", identity: true, mergeable: false },
    Row { tiny: "compacter:phm_dim=2,bottleneck_size=4", real: "compacter", identity: false, mergeable: false },
    Row { tiny: "low_rank_adapter:bottleneck_size=2", real: "low_rank_adapter", identity: false, mergeable: false },
    Row { tiny: "prefix:num_virtual_tokens=3", real: "prefix", identity: false, mergeable: false },
    Row { tiny: "prefix:num_virtual_tokens=3,prefix_projection=true,encoder_hidden_size=5", real: "prefix:prefix_projection=true", identity: false, mergeable: false },
    Row { tiny: "prompt:num_virtual_tokens=2", real: "prompt", identity: false, mergeable: false },
    Row { tiny: "bitfit", real: "bitfit", identity: true, mergeable: true },
    Row { tiny: "ln_tuning", real: "ln_tuning", identity: true, mergeable: true },
    Row { tiny: "finetune:target=encoder.layer.1", real: "finetune:target=encoder.layer.5", identity: true, mergeable: true },
    Row { tiny: "full", real: "full", identity: true, mergeable: true },
    Row { tiny: "loha:r=2,alpha=4,target=query+value+intermediate.dense", real: "loha", identity: true, mergeable: true },
    Row { tiny: "lokr:r=1,alpha=2,decompose_both=true,target=query+value+intermediate.dense", real: "lokr", identity: true, mergeable: true },
    Row { tiny: "lokr:r=2,init_weights=lycoris", real: "lokr:r=4,decompose_both=true,init_weights=lycoris", identity: true, mergeable: true },
    Row { tiny: "oft:oft_block_size=4,target=query+value+output.dense", real: "oft", identity: true, mergeable: true },
    Row { tiny: "oft:r=4,oft_block_size=0,use_cayley_neumann=false,block_share=true", real: "oft:oft_block_size=16,use_cayley_neumann=false", identity: true, mergeable: true },
    Row { tiny: "adalora:init_r=3,target_r=2,lora_alpha=4,total_step=10", real: "adalora", identity: true, mergeable: true },
];

fn pooled(model: &dyn Backbone, batch: &EncodedBatch) -> Tensor {
    model.forward(batch, &ForwardCtx::eval()).unwrap().pool(Pooling::Mean).unwrap()
}

fn loss(model: &dyn Backbone, batch: &EncodedBatch, probe: &Tensor) -> Tensor {
    pooled(model, batch).mul(probe).unwrap().sum_all().unwrap()
}

/// Every backbone tensor (base parameters of every site).
fn base_tensors(model: &dyn Backbone) -> Vec<(String, Tensor)> {
    model.sites().iter().flat_map(|s| s.params().iter().map(|(n, t)| (format!("{}.{n}", s.path()), t.clone())).collect::<Vec<_>>()).collect()
}

fn perturb(vars: &[(String, Var)], seed: u64, std: f32) {
    for (i, (name, v)) in vars.iter().enumerate() {
        let t = Stream::new(seed, &[name, &i.to_string()]).normal(v.dims(), 0.0, std, v.device()).unwrap();
        v.set(&v.as_tensor().add(&t).unwrap()).unwrap();
    }
}

fn run_row(dir: &std::path::Path, spec: &str, row: &Row, batch: &EncodedBatch, tol: f32) {
    let ctx = format!("[{spec}]");
    let mut model = BertModel::load(dir, &cpu()).unwrap();
    let base_out = pooled(&model, batch);
    let probe = Stream::new(1, &["probe"]).normal(base_out.dims(), 0.0, 1.0, &cpu()).unwrap();
    let s = DeltaSpec::parse_cli(spec).unwrap();
    attach::attach(&mut model, std::slice::from_ref(&s), AttachOptions { seed: 7, tokenizer: None }).unwrap();
    let vars = attach::trainable_vars(&model);
    assert!(!vars.is_empty(), "{ctx} no trainable tensors");
    // Identity at init.
    let fresh = pooled(&model, batch);
    let d0 = max_diff(&fresh, &base_out);
    if row.identity {
        assert!(d0 <= tol, "{ctx} a fresh delta changed outputs by {d0:e}");
    }
    // A trained (perturbed) delta changes outputs.
    perturb(&vars, 11, if tol < 1e-5 { 0.3 } else { 0.05 });
    let changed = pooled(&model, batch);
    assert!(max_diff(&changed, &base_out) > 1e-3, "{ctx} perturbed delta left outputs unchanged");
    // Gradients reach every delta tensor and no backbone tensor.
    let l0 = loss(&model, batch, &probe);
    let grads = l0.backward().unwrap();
    for (name, v) in &vars {
        let g = grads.get(v).unwrap_or_else(|| panic!("{ctx} no gradient for {name}"));
        let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n.is_finite() && n > 0.0, "{ctx} zero or non-finite gradient for {name}: {n}");
    }
    for (name, t) in base_tensors(&model) {
        assert!(grads.get(&t).is_none(), "{ctx} backbone tensor {name} received a gradient");
    }
    // One gradient step lowers the loss.
    for (_, v) in &vars {
        let g = grads.get(v).unwrap();
        v.set(&v.as_tensor().sub(&(g * 1e-3).unwrap()).unwrap()).unwrap();
    }
    let l1 = loss(&model, batch, &probe);
    let (a, b) = (l0.to_scalar::<f32>().unwrap(), l1.to_scalar::<f32>().unwrap());
    assert!(b < a, "{ctx} a gradient step did not lower the loss: {a} -> {b}");
    // Save → load is bit-exact.
    let tmp = tempfile::tempdir().unwrap();
    let saved = tmp.path().join("delta");
    store::save(&saved, &model, std::slice::from_ref(&s), &Default::default(), &Default::default()).unwrap();
    let mut fresh_model = BertModel::load(dir, &cpu()).unwrap();
    let loaded = store::load(&saved, &mut fresh_model, AttachOptions::default()).unwrap();
    assert_eq!(loaded.specs, vec![s.clone()], "{ctx} spec round trip");
    let (va, vb) = (attach::trainable_vars(&model), attach::trainable_vars(&fresh_model));
    assert_eq!(va.iter().map(|x| &x.0).collect::<Vec<_>>(), vb.iter().map(|x| &x.0).collect::<Vec<_>>(), "{ctx} names");
    for ((n, x), (_, y)) in va.iter().zip(&vb) {
        assert_eq!(max_diff(x.as_tensor(), y.as_tensor()), 0.0, "{ctx} {n} not bit-exact after load");
    }
    let trained = pooled(&model, batch);
    assert_eq!(max_diff(&pooled(&fresh_model, batch), &trained), 0.0, "{ctx} outputs differ after load");
    // Size: 4 bytes per saved value (trainable tensors and buffers) plus a small header.
    let bytes = std::fs::metadata(saved.join(store::WEIGHTS_FILE)).unwrap().len() as usize;
    let all = attach::saved_vars(&model);
    let params: usize = all.iter().map(|(_, v)| v.elem_count()).sum();
    assert!(params >= attach::count_trainable(&model), "{ctx} saved fewer values than it trains");
    assert!(bytes >= 4 * params && bytes < 4 * params + 200 * all.len() + 512, "{ctx} {bytes} bytes for {params} values");
    // Merge == unmerged; unmerge restores exactly.
    if row.mergeable {
        attach::merge_all(&mut model, true).unwrap();
        let merged = pooled(&model, batch);
        let d = max_diff(&merged, &trained);
        assert!(d <= tol.max(1e-5), "{ctx} merged differs from unmerged by {d:e}");
        attach::unmerge_all(&mut model);
        assert_eq!(max_diff(&pooled(&model, batch), &trained), 0.0, "{ctx} unmerge is not exact");
    } else {
        let err = attach::merge_all(&mut model, true).unwrap_err().to_string();
        assert!(err.contains("cannot be merged"), "{ctx} {err}");
        attach::unmerge_all(&mut model);
    }
    // Switching the group off restores the base model.
    attach::set_enabled(&mut model, &s.name, false).unwrap();
    assert!(max_diff(&pooled(&model, batch), &base_out) <= tol, "{ctx} disabled delta still active");
    attach::set_enabled(&mut model, &s.name, true).unwrap();
    assert_eq!(max_diff(&pooled(&model, batch), &trained), 0.0, "{ctx} re-enabled delta differs");
}

#[test]
fn every_method_on_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let batch = tiny_batch();
    for row in ROWS {
        run_row(&dir, row.tiny, row, &batch, 1e-6);
    }
}

#[test]
fn every_method_on_default_model() {
    let dir = crate::require_model!();
    let enc = deltatune::TextEncoder::from_file(&dir.join("tokenizer.json"), 32).unwrap();
    let batch = enc
        .batch(&[("The movie was great fun.", None), ("A dull, lifeless film.", None), ("Not bad at all", None)], deltatune::Padding::Longest, &cpu())
        .unwrap();
    for row in ROWS {
        run_row(&dir, row.real, row, &batch, 1e-5);
    }
}

/// Trainable parameter counts of each method with its defaults on all-MiniLM-L6-v2 (the README
/// table is generated from the same numbers by `deltatune inspect --json`).
#[test]
fn default_parameter_counts_on_minilm() {
    let dir = crate::require_model!();
    let cases: &[(&str, usize)] = &[
        ("lora", 73_728),
        ("dora", 73_728 + 12 * 384),
        ("ia3", 16_128),
        ("vera", 12 * (384 + 256)),
        ("adapter", 6 * (2 * 384 * 24 + 24 + 384)),
        ("houlsby", 12 * (2 * 384 * 24 + 24 + 384)),
        ("parallel_adapter", 6 * (2 * 384 * 192 + 192 + 384)),
        ("compacter", 12 * (4 * 96 + 4 * 6 + 24 + 4 * 6 + 4 * 96 + 384) + 2 * 64),
        ("low_rank_adapter", 12 * (3 * 384 + 3 * 12)),
        ("prefix", 10 * 6 * 2 * 384),
        ("prompt", 10 * 384),
        ("bitfit", 25_344),
        ("ln_tuning", 13 * 768),
        ("full", 22_713_216 - 147_840),
        // PEFT's --counts on the same model: 12 modules (query, value × 6 layers) each.
        ("loha", 12 * 2 * 8 * (384 + 384)),
        ("lokr", 12 * (16 * 16 + 8 * (24 + 24))),
        ("oft", 12 * (384 / 32) * (32 * 31 / 2)),
        ("adalora", 12 * (12 * 384 + 12 + 384 * 12)),
    ];
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    for (spec, expected) in cases {
        attach::remove_all(&mut model);
        let s = DeltaSpec::parse_cli(spec).unwrap();
        attach::attach(&mut model, &[s], AttachOptions::default()).unwrap();
        assert_eq!(attach::count_trainable(&model), *expected, "{spec}");
    }
}

#[test]
fn combination_of_methods() {
    // The Delta Tuning study's combinations: LoRA on q,v + BitFit + a parallel adapter on the FFN.
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    let specs: Vec<DeltaSpec> = ["lora:r=2", "bitfit", "parallel_adapter:name=par_ffn", "prompt:num_virtual_tokens=2"]
        .iter()
        .map(|s| DeltaSpec::parse_cli(s).unwrap())
        .collect();
    attach::attach(&mut model, &specs, AttachOptions { seed: 3, tokenizer: None }).unwrap();
    assert_eq!(attach::delta_names(&model), vec!["prompt", "lora", "bitfit", "par_ffn"]);
    let q = model.site("encoder.layer.0.attention.self.query").unwrap();
    let methods: Vec<&str> = q.deltas.iter().map(|a| a.delta.method()).collect();
    assert_eq!(methods, vec!["lora", "bitfit"]);
    let vars = attach::trainable_vars(&model);
    perturb(&vars, 5, 0.3);
    let batch = tiny_batch();
    let tmpd = tempfile::tempdir().unwrap();
    store::save(&tmpd.path().join("d"), &model, &specs, &Default::default(), &Default::default()).unwrap();
    let mut again = BertModel::load(&dir, &cpu()).unwrap();
    store::load(&tmpd.path().join("d"), &mut again, AttachOptions::default()).unwrap();
    assert_eq!(max_diff(&pooled(&model, &batch), &pooled(&again, &batch)), 0.0);
    // Switching one group off changes the output; the others stay.
    attach::set_enabled(&mut again, "par_ffn", false).unwrap();
    assert!(max_diff(&pooled(&model, &batch), &pooled(&again, &batch)) > 1e-4);
    let _ = DType::F32;
}

/// LoHa, LoKr and OFT train: a few plain gradient steps in training mode (rank and module dropout
/// on where the method has them) lower a fixed regression loss, and only the method's tensors
/// receive gradients.
#[test]
fn lycoris_and_oft_short_training_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let batch = tiny_batch();
    for spec in [
        "loha:r=2,alpha=4,rank_dropout=0.2,module_dropout=0.1",
        "lokr:r=1,decompose_both=true,rank_dropout=0.2,rank_dropout_scale=true,target=query+value+intermediate.dense",
        "oft:oft_block_size=4",
        "oft:oft_block_size=2,use_cayley_neumann=false,block_share=true",
    ] {
        let mut model = BertModel::load(&dir, &cpu()).unwrap();
        let s = DeltaSpec::parse_cli(spec).unwrap();
        attach::attach(&mut model, std::slice::from_ref(&s), AttachOptions { seed: 5, tokenizer: None }).unwrap();
        let vars = attach::trainable_vars(&model);
        let target = Stream::new(2, &["target"]).normal(pooled(&model, &batch).dims(), 0.0, 1.0, &cpu()).unwrap();
        let eval_loss = |m: &BertModel| pooled(m, &batch).sub(&target).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        let before = eval_loss(&model);
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..20u64 {
            let ctx = ForwardCtx::train(deltatune::ops::DropoutKey(step));
            let out = model.forward(&batch, &ctx).unwrap().pool(Pooling::Mean).unwrap();
            let l = out.sub(&target).unwrap().sqr().unwrap().mean_all().unwrap();
            let grads = l.backward().unwrap();
            for (name, t) in base_tensors(&model) {
                assert!(grads.get(&t).is_none(), "[{spec}] backbone tensor {name} received a gradient");
            }
            for (name, v) in &vars {
                // Module dropout may skip a whole site for a step: no gradient there then.
                match grads.get(v) {
                    Some(g) => {
                        v.set(&v.as_tensor().sub(&(g * 0.3).unwrap()).unwrap()).unwrap();
                        seen.insert(name.clone());
                    }
                    None => assert!(spec.contains("module_dropout"), "[{spec}] no gradient for {name}"),
                }
            }
        }
        assert_eq!(seen.len(), vars.len(), "[{spec}] some tensors never received a gradient");
        let after = eval_loss(&model);
        eprintln!("[{spec}] loss {before} -> {after}");
        assert!(after < 0.999 * before, "[{spec}] training did not lower the loss: {before} -> {after}");
    }
}

/// The block engine (one op per encoder layer) against the module-by-module path on the real
/// model with the deltas `specs`, every trained tensor moved off its initial value. The
/// module-by-module path is forced by routing every row to every delta (the engine declines
/// routed batches; the maths is the same). Outputs and every gradient agree; the engine's own
/// timers show that it ran (and its adapter kernel, with `adapter`).
fn engine_against_modules(specs: &[&str], adapter: bool) {
    engine_against_modules_in(specs, adapter, ForwardCtx::eval());
}

/// [`engine_against_modules`] in the forward mode `mode` (training: dropout on).
fn engine_against_modules_in(specs: &[&str], adapter: bool, mode: ForwardCtx) {
    use deltatune::core::RowRoute;
    let dir = crate::require_model!();
    let enc = deltatune::TextEncoder::from_file(&dir.join("tokenizer.json"), 32).unwrap();
    let batch = enc.batch(&[("The movie was great fun.", None), ("A dull, lifeless film.", None)], deltatune::Padding::Longest, &cpu()).unwrap();
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    let specs: Vec<_> = specs.iter().map(|s| DeltaSpec::parse_cli(s).unwrap()).collect();
    attach::attach(&mut model, &specs, AttachOptions { seed: 7, tokenizer: None }).unwrap();
    let vars = attach::trainable_vars(&model);
    perturb(&vars, 5, 0.05);
    let probe = Stream::new(1, &["probe"]).normal(&[2, 384], 0.0, 1.0, &cpu()).unwrap();
    let route = specs.iter().fold(RowRoute::new(2), |r, s| r.with(s.name.clone(), 0, 2));
    let run = |ctx: &ForwardCtx| {
        let y = model.forward(&batch, ctx).unwrap().pool(Pooling::Mean).unwrap();
        let grads = y.mul(&probe).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads)
    };
    let guard = crate::common::profile_lock();
    deltatune::ops::profile::set_enabled(true);
    let (y1, g1) = run(&mode);
    let ran = deltatune::ops::profile::take();
    deltatune::ops::profile::set_enabled(false);
    drop(guard);
    assert!(ran.iter().any(|e| e.op == "qkv-linear" && e.phase == "bwd"), "{specs:?}: the block engine did not run");
    assert!(!adapter || ran.iter().any(|e| e.op == "block-adapter" && e.phase == "bwd"), "{specs:?}: the engine's adapter did not run");
    let (y2, g2) = run(&ForwardCtx { route: Some(&route), ..mode.clone() });
    let d = max_diff(&y1, &y2);
    assert!(d <= 1e-5, "{specs:?}: outputs differ by {d:e}");
    // A key's bias has no gradient in exact arithmetic (it shifts every score of a query alike),
    // so each tensor's tolerance has a floor at 1% of the largest gradient's scale.
    let largest = |g: &candle_core::Tensor| g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let overall = vars.iter().map(|(_, v)| largest(g2.get(v).unwrap())).fold(0f32, f32::max);
    for (n, v) in &vars {
        let (a, b) = (g1.get(v).unwrap_or_else(|| panic!("no gradient for {n} (engine)")), g2.get(v).unwrap());
        let scale = largest(b);
        assert!(scale > 0.0, "zero gradient for {n}");
        let d = max_diff(a, b);
        assert!(d <= 1e-4 * scale.max(0.01 * overall), "{n}: gradients differ by {d:e} (scale {scale:e}, largest {overall:e})");
    }
}

/// LoRA on query, (IA)³ with its defaults (outputs of key and value, inputs of both output
/// maps), BitFit (every bias of every layer) and LayerNorm tuning (every norm's γ and β)
/// together.
#[test]
fn block_engine_matches_the_module_path_with_scales_biases_and_norms() {
    engine_against_modules(&["lora:r=4,lora_alpha=8,target=query", "ia3", "bitfit", "ln_tuning"], false);
}

/// Bottleneck adapters: Houlsby's (after both sublayers, swish) with LoRA and BitFit; the
/// parallel adapter; Compacter's PHM projections; the low-rank adapter.
#[test]
fn block_engine_matches_the_module_path_with_adapters() {
    engine_against_modules(&["houlsby:init_weights=bert", "lora:r=4,target=value", "bitfit"], true);
    engine_against_modules(&["parallel_adapter:init_weights=bert"], true);
    engine_against_modules(&["compacter"], true);
    engine_against_modules(&["low_rank_adapter"], true);
}

/// VeRA (its scaling vectors as the factors of a low-rank update) and AdaLoRA (A ⊙ E and B).
#[test]
fn block_engine_matches_the_module_path_with_vera_and_adalora() {
    engine_against_modules(&["vera"], false);
    engine_against_modules(&["adalora"], false);
}

/// LoHa and LoKr: their weight updates ΔW (expressions of their factors) added by the engine's
/// own product, the factors' gradients through candle's backward of the expression.
#[test]
fn block_engine_matches_the_module_path_with_loha_and_lokr() {
    engine_against_modules(&["loha:r=2,alpha=4,target=query+value+intermediate.dense"], false);
    engine_against_modules(&["lokr:r=2,decompose_both=true,target=key+attention.output.dense+output.dense", "lora:r=4,target=query"], false);
}

/// DoRA (a LoRA inside a magnitude scale that leaves the frozen bias out), alone and with BitFit
/// training the same maps' biases.
#[test]
fn block_engine_matches_the_module_path_with_dora() {
    engine_against_modules(&["dora:r=4,target=query+value+intermediate.dense"], false);
    engine_against_modules(&["dora:r=4,target=key+output.dense", "bitfit"], false);
    // With dropout in training: one weight update on the dropped input.
    let train = ForwardCtx::train(deltatune::ops::DropoutKey(3));
    engine_against_modules_in(&["dora:r=4,lora_dropout=0.1,target=query+intermediate.dense", "lora:r=4,target=value"], false, train);
}

/// Full fine-tuning (every weight, bias, norm and embedding trains: the engine computes the
/// weights' gradients `dyᵀ x` itself), and fine-tuning of chosen maps with LoRA on others.
#[test]
fn block_engine_matches_the_module_path_with_trained_weights() {
    engine_against_modules(&["full"], false);
    engine_against_modules(&["finetune:target=attention.output.dense+intermediate.dense", "lora:r=4,target=query+value"], false);
}

/// LoRA, VeRA and AdaLoRA with their dropout in training: the engine's low-rank update on the
/// dropped input (the mask the module path draws), with the layer's own dropout on.
#[test]
fn block_engine_matches_the_module_path_with_dropout() {
    let train = || ForwardCtx::train(deltatune::ops::DropoutKey(4));
    engine_against_modules_in(&["lora:r=4,lora_dropout=0.1,target=query+value+intermediate.dense+output.dense"], false, train());
    engine_against_modules_in(&["vera:r=16,vera_dropout=0.1,target=query+value", "bitfit"], false, train());
    engine_against_modules_in(&["adalora:lora_dropout=0.1,target=key+attention.output.dense"], false, train());
}

/// OFT: its input rotation folded into the weight (`W Rᵀ`), which the engine trains as a
/// fine-tuned weight, the rotation's gradient through candle's backward of the fold; exact Cayley
/// and the Neumann series, with a LoRA on other maps.
#[test]
fn block_engine_matches_the_module_path_with_oft() {
    engine_against_modules(&["oft:oft_block_size=16,target=query+value+output.dense"], false);
    engine_against_modules(&["oft:r=8,oft_block_size=0,use_cayley_neumann=true,target=key+intermediate.dense", "lora:r=4,target=query"], false);
}

/// Prefix tuning (keys and values before the sequence's in every layer's attention), plain and
/// through its reparametrisation MLP, with LoRA and an adapter.
#[test]
fn block_engine_matches_the_module_path_with_a_prefix() {
    engine_against_modules(&["prefix"], false);
    engine_against_modules(&["prefix:prefix_projection=true", "lora:r=4,target=query", "adapter:init_weights=bert"], true);
}
