//! PEFT interop against ../shared/golden: adapters saved by PEFT 0.21.2 load with output parity
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
