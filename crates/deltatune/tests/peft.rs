//! PEFT interop against ../shared/golden (LoRA, IA3, prefix, prompt) and the in-repo fixtures
//! tests/fixtures/peft (LoHa, LoKr, OFT): adapters saved by PEFT 0.21.2 load with output parity
//! (≤ 1e-4 abs on hidden states at valid tokens, ≤ 1e-5 on pooled), merge like
//! `merge_and_unload()`, and our LoRA/IA3 exports reproduce PEFT's files key for key.

use crate::common::*;
use candle_core::{DType, Tensor};
use deltatune::attach;
use deltatune::artifacts::peft;
use deltatune::delta::DeltaSpec;
use deltatune::io::TensorFile;
use deltatune::{Backbone, BertModel, ForwardCtx, Pooling};
use std::path::Path;

struct Case {
    model: BertModel,
    golden: TensorFile,
    batch: deltatune::EncodedBatch,
}

fn setup(adapter: &str, outputs: &str) -> Option<Case> {
    let dir = model_dir()?;
    let (Some(a), Some(o)) = (golden(adapter), golden(outputs)) else {
        eprintln!("SKIP: ../shared/golden absent");
        return None;
    };
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    peft::load(&a, &mut model, None).unwrap();
    let golden = TensorFile::load(&o, &cpu()).unwrap();
    let batch = batch_from(golden.get("input_ids").unwrap(), None, golden.get("attention_mask").unwrap());
    Some(Case { model, golden, batch })
}

fn check(out: &deltatune::ModelOutput, g: &TensorFile, prefix: &str, lengths: &[usize]) {
    let d = max_diff_valid(&out.last_hidden_state, g.get(&format!("{prefix}last_hidden_state")).unwrap(), lengths);
    assert!(d <= 1e-4, "{prefix}last_hidden_state: {d:e}");
    let d = max_diff(&out.pool(Pooling::Mean).unwrap(), g.get(&format!("{prefix}mean_pooled")).unwrap());
    assert!(d <= 1e-5, "{prefix}mean_pooled: {d:e}");
}

#[test]
fn lora_adapter_parity_and_merge() {
    let Some(mut c) = setup("peft_lora_minilm", "lora_outputs.safetensors") else { return };
    assert_eq!(attach::count_trainable(&c.model), 73_728);
    let out = c.model.forward(&c.batch, &ForwardCtx::eval()).unwrap();
    check(&out, &c.golden, "", &c.batch.lengths);
    // The adapter is not a no-op: the base model differs by far more than the tolerance.
    let base = BertModel::load(&model_dir().unwrap(), &cpu()).unwrap().forward(&c.batch, &ForwardCtx::eval()).unwrap();
    assert!(max_diff_valid(&base.last_hidden_state, &out.last_hidden_state, &c.batch.lengths) > 0.1);
    // merge_and_unload
    assert_eq!(attach::merge_all(&mut c.model, true).unwrap(), 12);
    for n in ["query", "value"] {
        let path = format!("encoder.layer.0.attention.self.{n}");
        let w = c.model.site(&path).unwrap().param("weight").unwrap().clone();
        let d = max_diff(&w, c.golden.get(&format!("merged.{path}.weight")).unwrap());
        assert!(d <= 1e-6, "merged {path}: {d:e}");
    }
    let merged = c.model.forward(&c.batch, &ForwardCtx::eval()).unwrap();
    check(&merged, &c.golden, "merged.", &c.batch.lengths);
    assert!(max_diff_valid(&merged.last_hidden_state, &out.last_hidden_state, &c.batch.lengths) <= 1e-5);
    // Unmerge restores the base weights exactly.
    attach::unmerge_all(&mut c.model);
    let again = c.model.forward(&c.batch, &ForwardCtx::eval()).unwrap();
    assert_eq!(max_diff(&again.last_hidden_state, &out.last_hidden_state), 0.0);
}

#[test]
fn ia3_adapter_parity_and_merge() {
    let Some(mut c) = setup("peft_ia3_minilm", "ia3_outputs.safetensors") else { return };
    assert_eq!(attach::count_trainable(&c.model), 16_128);
    let out = c.model.forward(&c.batch, &ForwardCtx::eval()).unwrap();
    check(&out, &c.golden, "", &c.batch.lengths);
    assert_eq!(attach::merge_all(&mut c.model, true).unwrap(), 24);
    let merged = c.model.forward(&c.batch, &ForwardCtx::eval()).unwrap();
    check(&merged, &c.golden, "merged.", &c.batch.lengths);
}

#[test]
fn prefix_adapter_parity() {
    let Some(c) = setup("peft_prefix_minilm", "prefix_outputs.safetensors") else { return };
    assert_eq!(attach::count_trainable(&c.model), 46_080);
    let out = c.model.forward(&c.batch, &ForwardCtx::eval()).unwrap();
    check(&out, &c.golden, "", &c.batch.lengths);
}

#[test]
fn prompt_adapter_parity() {
    let Some(c) = setup("peft_prompt_minilm", "prompt_outputs.safetensors") else { return };
    assert_eq!(attach::count_trainable(&c.model), 3_840);
    let out = c.model.forward(&c.batch, &ForwardCtx::eval()).unwrap();
    assert_eq!(out.num_virtual, 10);
    let g = &c.golden;
    let full_lengths: Vec<usize> = c.batch.lengths.iter().map(|l| l + 10).collect();
    let d = max_diff_valid(&out.last_hidden_state, g.get("last_hidden_state").unwrap(), &full_lengths);
    assert!(d <= 1e-4, "last_hidden_state {d:e}");
    let d = max_diff(&out.pool(Pooling::Mean).unwrap(), g.get("mean_pooled_real_tokens").unwrap());
    assert!(d <= 1e-5, "mean_pooled_real_tokens {d:e}");
    let all = deltatune::core::mean_pool(&out.last_hidden_state, &out.attention_mask).unwrap();
    let d = max_diff(&all, g.get("mean_pooled_all_positions").unwrap());
    assert!(d <= 1e-5, "mean_pooled_all_positions {d:e}");
    let mask = out.attention_mask.to_dtype(DType::F32).unwrap();
    assert_eq!(max_diff(&mask, &g.get("full_attention_mask").unwrap().to_dtype(DType::F32).unwrap()), 0.0);
}

fn read_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
}

#[test]
fn lora_and_ia3_export_match_peft_files() {
    let Some(dir) = model_dir() else { return };
    for name in ["peft_lora_minilm", "peft_ia3_minilm"] {
        let Some(src) = golden(name) else { return };
        let mut model = BertModel::load(&dir, &cpu()).unwrap();
        let loaded = peft::load(&src, &mut model, None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("export");
        peft::export(&out, &model, &loaded.specs[0], "sentence-transformers/all-MiniLM-L6-v2", &Default::default()).unwrap();
        // Same config fields and values.
        let (mine, theirs) = (read_config(&out), read_config(&src));
        assert_eq!(mine, theirs, "{name}: adapter_config.json differs");
        // Same keys, shapes, values and metadata.
        let a = TensorFile::load(&out.join("adapter_model.safetensors"), &cpu()).unwrap();
        let b = TensorFile::load(&src.join("adapter_model.safetensors"), &cpu()).unwrap();
        assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>(), "{name}: keys differ");
        for k in b.names() {
            assert_eq!(max_diff(a.get(k).unwrap(), b.get(k).unwrap()), 0.0, "{name}: {k}");
        }
        assert_eq!(a.metadata, b.metadata);
        // And the export loads back.
        let mut again = BertModel::load(&dir, &cpu()).unwrap();
        peft::load(&out, &mut again, None).unwrap();
        let _ = Tensor::zeros(1, DType::F32, &cpu());
    }
}

// ---------------------------------------------------------------------------------------------
// DoRA and VeRA against the PEFT fixtures of tests/fixtures/peft (PEFT 0.21.2 save_pretrained
// folders plus PEFT's unmerged and merged outputs; see the README there).
// ---------------------------------------------------------------------------------------------

const FIXTURE_BASE: &str = "sentence-transformers/all-MiniLM-L6-v2";

struct Fixture {
    dir: std::path::PathBuf,
    src: std::path::PathBuf,
    model: BertModel,
    expected: TensorFile,
    batch: deltatune::EncodedBatch,
}

fn load_fixture(name: &str) -> Option<Fixture> {
    let dir = model_dir()?;
    let src = fixture(&format!("peft/{name}"));
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    peft::load(&src, &mut model, None).unwrap();
    let expected = TensorFile::load(&src.join("expected.safetensors"), &cpu()).unwrap();
    let batch = batch_from(expected.get("input_ids").unwrap(), None, expected.get("attention_mask").unwrap());
    Some(Fixture { dir, src, model, expected, batch })
}

fn sorted_targets(mut cfg: serde_json::Value) -> serde_json::Value {
    if let Some(list) = cfg["target_modules"].as_array_mut() {
        list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
    cfg
}

/// Unmerged and merged parity with PEFT on real tokens, merged weight rows, export → PEFT's own
/// files, re-import. Returns (unmerged, merged, merged rows) max abs differences.
fn fixture_roundtrip(name: &str, method: &str, modules: usize, trainable: usize) -> Option<(f32, f32, f32)> {
    let mut f = load_fixture(name)?;
    let lengths = f.batch.lengths.clone();
    assert_eq!(f.batch.lengths, vec![8, 5, 4]);
    let q = f.model.sites().iter().find(|s| !s.deltas.is_empty()).map(|s| s.deltas[0].delta.method()).unwrap();
    assert_eq!(q, method, "{name}: imported as {q}");
    assert_eq!(attach::count_trainable(&f.model), trainable, "{name}: trainable count");
    let out = f.model.forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    let d_out = max_diff_valid(&out, f.expected.get("last_hidden_state").unwrap(), &lengths);
    assert!(d_out <= 1e-4, "{name}: last_hidden_state differs from PEFT by {d_out:e}");
    let base = BertModel::load(&f.dir, &cpu()).unwrap().forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    assert!(max_diff_valid(&base, &out, &lengths) > 0.03, "{name}: the adapter is a no-op");

    // Export reproduces PEFT's files: every config field, keys, shapes, values, metadata.
    let tmp = tempfile::tempdir().unwrap();
    let exported = tmp.path().join("export");
    let loaded_spec = peft::spec_from_config(&f.src.join("adapter_config.json"), &f.model).unwrap();
    peft::export(&exported, &f.model, &loaded_spec, FIXTURE_BASE, &Default::default()).unwrap();
    // Every field equal; `target_modules` is a set in PEFT (written in string-hash order), ours
    // is sorted, so it compares as a set.
    assert_eq!(sorted_targets(read_config(&exported)), sorted_targets(read_config(&f.src)), "{name}: adapter_config.json differs");
    let a = TensorFile::load(&exported.join("adapter_model.safetensors"), &cpu()).unwrap();
    let b = TensorFile::load(&f.src.join("adapter_model.safetensors"), &cpu()).unwrap();
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>(), "{name}: keys differ");
    for k in b.names() {
        assert_eq!(max_diff(a.get(k).unwrap(), b.get(k).unwrap()), 0.0, "{name}: {k}");
    }
    assert_eq!(a.metadata, b.metadata, "{name}: metadata");
    // Re-import gives identical outputs.
    let mut again = BertModel::load(&f.dir, &cpu()).unwrap();
    peft::load(&exported, &mut again, None).unwrap();
    let out2 = again.forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    assert_eq!(max_diff(&out, &out2), 0.0, "{name}: re-imported export differs");

    // merge_and_unload: the merged weight rows and outputs.
    assert_eq!(attach::merge_all(&mut f.model, true).unwrap(), modules);
    let row_key = f.expected.names().find(|k| k.starts_with("merged.") && k.ends_with(".weight_rows")).unwrap().to_string();
    let module = row_key.trim_start_matches("merged.").trim_end_matches(".weight_rows");
    let rows = f.expected.get("merged_row_index").unwrap().to_dtype(DType::U32).unwrap();
    let w = f.model.site(module).unwrap().param("weight").unwrap().index_select(&rows, 0).unwrap();
    let d_rows = max_diff(&w, f.expected.get(&row_key).unwrap());
    assert!(d_rows <= 1e-5, "{name}: merged rows of {module} differ by {d_rows:e}");
    let merged = f.model.forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    let d_merged = max_diff_valid(&merged, f.expected.get("merged_last_hidden_state").unwrap(), &lengths);
    assert!(d_merged <= 1e-4, "{name}: merged output differs from PEFT by {d_merged:e}");
    attach::unmerge_all(&mut f.model);
    let back = f.model.forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    assert_eq!(max_diff(&back, &out), 0.0, "{name}: unmerge is not exact");
    eprintln!("{name}: max abs diff vs PEFT {d_out:.2e} unmerged, {d_merged:.2e} merged, {d_rows:.2e} merged weight rows");
    Some((d_out, d_merged, d_rows))
}

#[test]
fn dora_fixture_parity_merge_export() {
    fixture_roundtrip("dora", "dora", 4, 7_680);
}

#[test]
fn vera_fixture_parity_merge_export() {
    fixture_roundtrip("vera", "vera", 2, 1_926);
}

/// A LoRA config with `use_dora` is DoRA, in specs as in PEFT configs.
#[test]
fn use_dora_selects_dora() {
    use deltatune::delta::DeltaConfig;
    let a = DeltaSpec::parse_cli("lora:use_dora=true,r=4,alpha=8").unwrap();
    let b = DeltaSpec::parse_cli("dora:r=4,lora_alpha=8").unwrap();
    assert_eq!(a, b);
    assert_eq!(a.name, "dora");
    assert!(matches!(a.config, DeltaConfig::Dora(_)));
    let plain = DeltaSpec::parse_cli("lora:use_dora=false,r=4").unwrap();
    assert!(matches!(plain.config, DeltaConfig::Lora(_)));
    let (j, w) = DeltaSpec::from_json(&serde_json::json!({"method": "lora", "use_dora": true, "r": 2, "name": "d"}), "test").unwrap();
    assert!(w.is_empty(), "{w:?}");
    assert!(matches!(j.config, DeltaConfig::Dora(_)) && j.name == "d");
    let e = DeltaSpec::parse_cli("lora:use_dora=3").unwrap_err().to_string();
    assert!(e.contains("use_dora"), "{e}");
    // The DoRA spec round-trips through its JSON form.
    let (again, _) = DeltaSpec::from_json(&b.to_json(), "test").unwrap();
    assert_eq!(again, b);
}

/// A fresh VeRA draws PEFT's projections bit for bit (torch's generator seeded with
/// projection_prng_key), and an adapter saved without them (save_projection=false) loads.
#[test]
fn vera_projections_match_peft_and_regenerate() {
    let Some(mut f) = load_fixture("vera") else { return };
    let saved = TensorFile::load(&f.src.join("adapter_model.safetensors"), &cpu()).unwrap();
    let mut fresh = BertModel::load(&f.dir, &cpu()).unwrap();
    let spec = DeltaSpec::parse_cli("vera:r=3,projection_prng_key=7,d_initial=0.2,target=query+intermediate.dense,layers=2").unwrap();
    attach::attach(&mut fresh, &[spec], Default::default()).unwrap();
    let buffers: Vec<_> = attach::group_vars(&fresh, "vera").into_iter().filter(|(s, _, _)| s.is_empty()).collect();
    assert_eq!(buffers.len(), 2);
    for (_, n, v) in &buffers {
        assert_eq!(max_diff(v.as_tensor(), saved.get(&format!("base_model.{n}")).unwrap()), 0.0, "{n} differs from PEFT's");
    }
    // The fresh delta is the identity (λ_b = 0) with λ_d = d_initial.
    let base = BertModel::load(&f.dir, &cpu()).unwrap().forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    let out = fresh.forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    assert_eq!(max_diff(&out, &base), 0.0);
    // save_projection=false: PEFT saves only the λ vectors; the projections come from the key.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("noproj");
    std::fs::create_dir(&dir).unwrap();
    let mut cfg = read_config(&f.src);
    cfg["save_projection"] = serde_json::json!(false);
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let kept: std::collections::BTreeMap<String, Tensor> =
        saved.names().filter(|k| !k.starts_with("base_model.vera_")).map(|k| (k.to_string(), saved.get(k).unwrap().clone())).collect();
    deltatune::io::save_tensors(&dir.join("adapter_model.safetensors"), &kept, None).unwrap();
    let mut m = BertModel::load(&f.dir, &cpu()).unwrap();
    peft::load(&dir, &mut m, None).unwrap();
    let want = f.model.forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    assert_eq!(max_diff(&m.forward(&f.batch, &ForwardCtx::eval()).unwrap().last_hidden_state, &want), 0.0);
    // Its export writes no projections either, like PEFT.
    let out_dir = tmp.path().join("noproj_export");
    let spec = peft::spec_from_config(&dir.join("adapter_config.json"), &m).unwrap();
    peft::export(&out_dir, &m, &spec, FIXTURE_BASE, &Default::default()).unwrap();
    let e = TensorFile::load(&out_dir.join("adapter_model.safetensors"), &cpu()).unwrap();
    assert_eq!(e.names().collect::<Vec<_>>(), kept.keys().map(|k| k.as_str()).collect::<Vec<_>>());
    let _ = &mut f;
}

/// A few AdamW steps from the PEFT adapters lower a classification loss; gradients reach only
/// the method's trainable tensors (not VeRA's shared projections, not the backbone).
#[test]
fn dora_and_vera_train_from_peft_adapters() {
    use deltatune::head::{Head, HeadConfig, HeadKind};
    use deltatune::train::optim::{AdamW, AdamWConfig};
    for name in ["dora", "vera"] {
        let Some(f) = load_fixture(name) else { return };
        let vars = attach::trainable_vars(&f.model);
        let all = attach::saved_vars(&f.model);
        let head = Head::new(HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: Pooling::Mean, hidden_size: 384 }, 3, &cpu()).unwrap();
        let labels = Tensor::new(&[1u32, 0, 1], &cpu()).unwrap();
        let key = deltatune::ops::DropoutKey(9);
        let loss_of = |train: bool| {
            let ctx = if train { ForwardCtx::train(key) } else { ForwardCtx::eval() };
            let out = f.model.forward(&f.batch, &ctx).unwrap();
            head.loss(&head.forward(&out).unwrap(), &labels).unwrap()
        };
        let l0 = loss_of(false).to_scalar::<f32>().unwrap();
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
        for _ in 0..5 {
            let loss = loss_of(true);
            let grads = loss.backward().unwrap();
            for (n, v) in &all {
                let has = grads.get(v).is_some();
                assert_eq!(has, vars.iter().any(|(m, _)| m == n), "{name}: gradient presence of {n}");
            }
            let map = vars.iter().map(|(n, v)| (n.clone(), grads.get(v).unwrap().clone())).collect();
            opt.step(&map, 1e-2).unwrap();
        }
        let l1 = loss_of(false).to_scalar::<f32>().unwrap();
        eprintln!("{name}: loss {l0:.4} -> {l1:.4} after 5 AdamW steps");
        assert!(l1 < l0, "{name}: training did not lower the loss: {l0} -> {l1}");
    }
}

/// Bad values are errors naming the field (spec, and PEFT config).
#[test]
fn dora_and_vera_bad_values() {
    let Some(dir) = model_dir() else { return };
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    for (spec, field) in [
        ("dora:r=0", "r must be"),
        ("dora:lora_dropout=1.5", "lora_dropout"),
        ("dora:lora_alpha=-1", "lora_alpha"),
        ("dora:fan_in_fan_out=true", "fan_in_fan_out"),
        ("vera:r=0", "r must be"),
        ("vera:vera_dropout=1", "vera_dropout"),
        ("vera:fan_in_fan_out=true", "fan_in_fan_out"),
    ] {
        let s = DeltaSpec::parse_cli(spec).unwrap();
        let e = attach::attach(&mut model, &[s], Default::default()).unwrap_err().to_string();
        assert!(e.contains(field), "{spec}: {e}");
    }
    let e = DeltaSpec::parse_cli("vera:projection_prng_key=-3").unwrap_err().to_string();
    assert!(e.contains("projection_prng_key"), "{e}");
    let e = DeltaSpec::parse_cli("vera:d_inital=0.2").unwrap_err().to_string();
    assert!(e.contains("did you mean `d_initial`"), "{e}");
    // PEFT configs: each edit names its field and the file.
    let tmp = tempfile::tempdir().unwrap();
    for (name, key, value, needle) in [
        ("vera", "projection_prng_key", serde_json::json!(-1), "projection_prng_key"),
        ("vera", "bias", serde_json::json!("all"), "bias"),
        ("vera", "r", serde_json::json!(0), "r must be"),
        ("vera", "d_initial", serde_json::json!("big"), "d_initial"),
        ("dora", "r", serde_json::json!(0), "r must be"),
        ("dora", "use_dora", serde_json::json!("yes"), "use_dora"),
    ] {
        let src = fixture(&format!("peft/{name}"));
        let d = tmp.path().join(format!("{name}-{key}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(src.join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
        let mut cfg = read_config(&src);
        cfg[key] = value;
        std::fs::write(d.join("adapter_config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        let mut m = BertModel::load(&dir, &cpu()).unwrap();
        let e = peft::load(&d, &mut m, None).unwrap_err().to_string();
        assert!(e.contains(needle), "{name} {key}: {e}");
        assert!(attach::delta_names(&m).is_empty(), "{name} {key}: a failed load left a delta attached");
    }
}

/// DoRA's dropout path (training only): the dropped input feeds both the LoRA branch and a
/// recomputed base output, as in PEFT; it is deterministic per key, differs from eval, and its
/// gradients reach A, B and the magnitude.
#[test]
fn dora_dropout_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    let spec = DeltaSpec::parse_cli("dora:r=2,lora_dropout=0.5,init_lora_weights=random").unwrap();
    attach::attach(&mut model, &[spec], Default::default()).unwrap();
    let batch = tiny_batch();
    let key = deltatune::ops::DropoutKey(4);
    let run = |ctx: &ForwardCtx| model.forward(&batch, ctx).unwrap().pool(Pooling::Mean).unwrap();
    let (t1, t2, e) = (run(&ForwardCtx::train(key)), run(&ForwardCtx::train(key)), run(&ForwardCtx::eval()));
    assert_eq!(max_diff(&t1, &t2), 0.0);
    assert!(max_diff(&t1, &e) > 1e-4);
    let grads = t1.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (n, v) in attach::trainable_vars(&model) {
        let g = grads.get(&v).unwrap_or_else(|| panic!("no gradient for {n}"));
        assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{n}");
    }
}

// ---------------------------------------------------------------------------------------------
// In-repo PEFT fixtures (tests/fixtures/peft, PEFT 0.21.2): LoHa, LoKr, OFT.
// ---------------------------------------------------------------------------------------------

/// Loads fixture folder `name`, checks forward, merge and merged weight rows against PEFT's
/// outputs, exports it, compares the export with PEFT's files and re-imports it. Returns the
/// (unmerged, merged, merged rows) max abs differences.
fn fixture_round(name: &str, trainable: usize) -> Option<(f32, f32, f32)> {
    let dir = model_dir()?;
    let src = fixture(&format!("peft/{name}"));
    let exp = TensorFile::load(&src.join("expected.safetensors"), &cpu()).unwrap();
    let batch = batch_from(exp.get("input_ids").unwrap(), None, exp.get("attention_mask").unwrap());
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    let loaded = peft::load(&src, &mut model, None).unwrap();
    assert_eq!(attach::count_trainable(&model), trainable, "{name}: trainable count");
    let out = model.forward(&batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    let d_unmerged = max_diff_valid(&out, exp.get("last_hidden_state").unwrap(), &batch.lengths);
    assert!(d_unmerged <= 1e-4, "{name}: last_hidden_state differs from PEFT by {d_unmerged:e}");
    // The adapter is far from a no-op.
    let base = BertModel::load(&dir, &cpu()).unwrap().forward(&batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    assert!(max_diff_valid(&base, &out, &batch.lengths) > 0.03, "{name}: adapter moves nothing");

    // Export before merging: same keys, shapes, values, metadata and config fields as PEFT's.
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("export");
    peft::export(&out_dir, &model, &loaded.specs[0], "sentence-transformers/all-MiniLM-L6-v2", &Default::default()).unwrap();
    let (mut mine, mut theirs) = (read_config(&out_dir), read_config(&src));
    // PEFT writes target_modules in Python set order; we write them sorted.
    for c in [&mut mine, &mut theirs] {
        if let Some(serde_json::Value::Array(a)) = c.get_mut("target_modules") {
            a.sort_by_key(|v| v.to_string());
        }
    }
    assert_eq!(mine, theirs, "{name}: adapter_config.json differs");
    let a = TensorFile::load(&out_dir.join("adapter_model.safetensors"), &cpu()).unwrap();
    let b = TensorFile::load(&src.join("adapter_model.safetensors"), &cpu()).unwrap();
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>(), "{name}: keys differ");
    for k in b.names() {
        assert_eq!(a.get(k).unwrap().dims(), b.get(k).unwrap().dims(), "{name}: {k} shape");
        assert_eq!(max_diff(a.get(k).unwrap(), b.get(k).unwrap()), 0.0, "{name}: {k}");
    }
    assert_eq!(a.metadata, b.metadata);
    let mut again = BertModel::load(&dir, &cpu()).unwrap();
    peft::load(&out_dir, &mut again, None).unwrap();
    let re = again.forward(&batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    assert_eq!(max_diff(&re, &out), 0.0, "{name}: re-imported export differs");

    // merge_and_unload: merged weight rows and outputs.
    let n = attach::merge_all(&mut model, true).unwrap();
    assert!(n > 0);
    let rows_key = exp.names().find(|k| k.starts_with("merged.") && k.ends_with(".weight_rows")).unwrap().to_string();
    let module = &rows_key["merged.".len()..rows_key.len() - ".weight_rows".len()];
    let idx = exp.get("merged_row_index").unwrap().to_dtype(DType::U32).unwrap();
    let w = model.site(module).unwrap().param("weight").unwrap().index_select(&idx, 0).unwrap();
    let d_rows = max_diff(&w, exp.get(&rows_key).unwrap());
    assert!(d_rows <= 1e-5, "{name}: merged rows of {module} differ by {d_rows:e}");
    let merged = model.forward(&batch, &ForwardCtx::eval()).unwrap().last_hidden_state;
    let d_merged = max_diff_valid(&merged, exp.get("merged_last_hidden_state").unwrap(), &batch.lengths);
    assert!(d_merged <= 1e-4, "{name}: merged_last_hidden_state differs by {d_merged:e}");
    attach::unmerge_all(&mut model);
    assert_eq!(max_diff(&model.forward(&batch, &ForwardCtx::eval()).unwrap().last_hidden_state, &out), 0.0);
    eprintln!("{name}: |ours - PEFT| unmerged {d_unmerged:.2e}, merged {d_merged:.2e}, merged rows {d_rows:.2e}");
    Some((d_unmerged, d_merged, d_rows))
}

#[test]
fn loha_fixture_parity_merge_export() {
    fixture_round("loha", 6_144);
}

#[test]
fn lokr_fixture_parity_merge_export() {
    fixture_round("lokr", 3_968);
}

#[test]
fn oft_fixture_parity_merge_export() {
    fixture_round("oft", 5_376);
}

#[test]
fn oft_exact_cayley_fixture_parity_merge_export() {
    fixture_round("oft_cayley", 5_760);
}

/// PEFT's LoKr shape rule on every tabulated (dim, factor).
#[test]
fn lokr_factorization_matches_peft_table() {
    let text = std::fs::read_to_string(fixture("peft/lokr/factorization.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 66);
    for c in cases {
        let (dim, factor) = (c["dim"].as_u64().unwrap() as usize, c["factor"].as_i64().unwrap());
        let want: Vec<usize> = c["result"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let got = deltatune::delta::lokr::factorization(dim, factor);
        assert_eq!(vec![got.0, got.1], want, "factorization({dim}, {factor})");
    }
}

/// Bad LoHa / LoKr / OFT values are refused with the field (and, for per-module sizes, the module) named.
#[test]
fn lycoris_and_oft_bad_values_name_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let attach_err = |spec: &str| -> String {
        let mut model = BertModel::load(&dir, &cpu()).unwrap();
        match deltatune::delta::DeltaSpec::parse_cli(spec) {
            Err(e) => e.to_string(),
            Ok(s) => attach::attach(&mut model, &[s], Default::default()).unwrap_err().to_string(),
        }
    };
    let cases: &[(&str, &[&str])] = &[
        ("loha:r=0", &["loha", "r must be at least 1"]),
        ("loha:alpha=-1", &["loha", "alpha"]),
        ("loha:rank_dropout=1.5", &["loha", "rank_dropout"]),
        ("lokr:r=0", &["lokr", "r must be at least 1"]),
        ("lokr:decompose_factor=0", &["lokr", "decompose_factor"]),
        ("lokr:module_dropout=-0.1", &["lokr", "module_dropout"]),
        ("lokr:init_weights=pissa", &["invalid lokr config"]),
        ("oft:oft_block_size=3", &["oft_block_size 3", "input width 8", "encoder.layer.0.attention.self.query", "PEFT would silently use 2"]),
        ("oft:r=3,oft_block_size=0", &["r 3", "encoder.layer.0.attention.self.query"]),
        ("oft:r=2,oft_block_size=4", &["either r (2) or oft_block_size (4)"]),
        ("oft:oft_block_size=0", &["one of r and oft_block_size"]),
        ("oft:oft_block_size=4,num_cayley_neumann_terms=1", &["num_cayley_neumann_terms"]),
        ("oft:oft_block_size=4,coft=true", &["coft"]),
    ];
    for (spec, needles) in cases {
        let e = attach_err(spec);
        for n in *needles {
            assert!(e.contains(n), "{spec}: `{n}` not in error: {e}");
        }
    }
    // A bad per-module pattern names the pattern and its key.
    let v = serde_json::json!({"method": "lokr", "rank_pattern": {"(": 4}});
    let (s, _) = deltatune::delta::DeltaSpec::from_json(&v, "cfg.json").unwrap();
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    let e = attach::attach(&mut model, &[s], Default::default()).unwrap_err().to_string();
    assert!(e.contains("rank_pattern key `(`"), "{e}");
    let v = serde_json::json!({"method": "loha", "alpha_pattern": {"query": 0}});
    let (s, _) = deltatune::delta::DeltaSpec::from_json(&v, "cfg.json").unwrap();
    let e = attach::attach(&mut model, &[s], Default::default()).unwrap_err().to_string();
    assert!(e.contains("alpha_pattern entry `query`"), "{e}");
}

/// A PEFT config with an unsupported OFT option is refused naming the file and the field.
#[test]
fn oft_import_refuses_coft_and_old_format() {
    let Some(dir) = model_dir() else { return };
    for (edit, needle) in [("coft", "coft"), ("oft_block_size", "before PEFT 0.14")] {
        let tmp = tempfile::tempdir().unwrap();
        let src = fixture("peft/oft");
        let d = tmp.path().join("a");
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(src.join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
        let mut cfg = read_config(&src);
        let obj = cfg.as_object_mut().unwrap();
        if edit == "coft" {
            obj.insert("coft".into(), serde_json::Value::Bool(true));
        } else {
            obj.remove("oft_block_size");
        }
        std::fs::write(d.join("adapter_config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        let mut model = BertModel::load(&dir, &cpu()).unwrap();
        let e = peft::load(&d, &mut model, None).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("adapter_config.json"), "{e}");
    }
}

/// AdaLoRA against PEFT's own folder after 6 allocation steps (tests/fixtures/peft/adalora):
/// rank-trimmed tensors load (expanded back to init_r), the scale stays lora_alpha / (init_r +
/// 1e-5), outputs and merge match PEFT, and the export reproduces PEFT's files.
#[test]
fn adalora_fixture_parity_merge_export() {
    let Some(dir) = model_dir() else { return };
    let src = fixture("peft/adalora");
    let exp = TensorFile::load(&src.join("expected.safetensors"), &cpu()).unwrap();
    let batch = batch_from(exp.get("input_ids").unwrap(), None, exp.get("attention_mask").unwrap());
    let mut model = BertModel::load(&dir, &cpu()).unwrap();
    let loaded = peft::load(&src, &mut model, None).unwrap();
    // Trainable tensors keep init_r = 4 ranks per module (PEFT's count before trimming).
    assert_eq!(attach::count_trainable(&model), 4 * 4 * (384 + 1 + 384));
    let deltatune::delta::DeltaConfig::AdaLora(cfg) = &loaded.specs[0].config else { panic!("not adalora") };
    let ranknum = exp.get("ranknum").unwrap().to_vec1::<f32>().unwrap()[0];
    assert_eq!(ranknum as usize, cfg.init_r);
    assert!((cfg.scale() - 6.0 / (ranknum as f64 + 1e-5)).abs() < 1e-12);
    let out = model.forward(&batch, &ForwardCtx::eval()).unwrap();
    let d = max_diff_valid(&out.last_hidden_state, exp.get("last_hidden_state").unwrap(), &batch.lengths);
    eprintln!("adalora: unmerged max abs diff vs PEFT (real tokens) {d:.2e}");
    assert!(d <= 1e-4, "adalora last_hidden_state: {d:e}");
    let base = BertModel::load(&dir, &cpu()).unwrap().forward(&batch, &ForwardCtx::eval()).unwrap();
    assert!(max_diff_valid(&base.last_hidden_state, &out.last_hidden_state, &batch.lengths) > 0.01);
    // Export before merging: PEFT's keys (trimmed), shapes, values, config fields (rank_pattern
    // included); then re-import computes the same.
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("export");
    peft::export(&dst, &model, &loaded.specs[0], "sentence-transformers/all-MiniLM-L6-v2", &Default::default()).unwrap();
    assert_eq!(read_config(&dst), read_config(&src), "adapter_config.json differs");
    let a = TensorFile::load(&dst.join("adapter_model.safetensors"), &cpu()).unwrap();
    let b = TensorFile::load(&src.join("adapter_model.safetensors"), &cpu()).unwrap();
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>(), "keys differ");
    for k in b.names() {
        assert_eq!(a.get(k).unwrap().dims(), b.get(k).unwrap().dims(), "{k}");
        assert_eq!(max_diff(a.get(k).unwrap(), b.get(k).unwrap()), 0.0, "{k}");
    }
    assert_eq!(a.metadata, b.metadata);
    let mut again = BertModel::load(&dir, &cpu()).unwrap();
    peft::load(&dst, &mut again, None).unwrap();
    let out2 = again.forward(&batch, &ForwardCtx::eval()).unwrap();
    assert_eq!(max_diff(&out2.last_hidden_state, &out.last_hidden_state), 0.0, "re-import differs");
    // Merge: weight rows and outputs as PEFT's merge_and_unload.
    assert_eq!(attach::merge_all(&mut model, true).unwrap(), 4);
    let rows = exp.get("merged_row_index").unwrap().to_dtype(DType::U32).unwrap();
    let path = "encoder.layer.0.attention.self.query";
    let w = model.site(path).unwrap().param("weight").unwrap().index_select(&rows, 0).unwrap();
    let dw = max_diff(&w, exp.get(&format!("merged.{path}.weight_rows")).unwrap());
    let merged = model.forward(&batch, &ForwardCtx::eval()).unwrap();
    let dm = max_diff_valid(&merged.last_hidden_state, exp.get("merged_last_hidden_state").unwrap(), &batch.lengths);
    eprintln!("adalora: merged weight rows diff {dw:.2e}, merged output diff {dm:.2e}");
    assert!(dw <= 1e-6, "merged rows {dw:e}");
    assert!(dm <= 1e-4, "merged output {dm:e}");
}
