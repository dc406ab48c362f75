//! PEFT interop against ../shared/golden (LoRA, IA3, prefix, prompt) and the in-repo fixtures
//! tests/fixtures/peft (LoHa, LoKr, OFT): adapters saved by PEFT 0.21.2 load with output parity
//! (≤ 1e-4 abs on hidden states at valid tokens, ≤ 1e-5 on pooled), merge like
//! `merge_and_unload()`, and our LoRA/IA3 exports reproduce PEFT's files key for key.

use crate::common::*;
use candle_core::{DType, Tensor};
use deltatune::attach;
use deltatune::artifacts::peft;
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
