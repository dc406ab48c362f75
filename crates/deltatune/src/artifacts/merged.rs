//! Merged models: every mergeable delta folded into the base weights and written as a plain
//! model directory that loads without deltatune — an HF BERT-family directory (encoders) or an
//! HF Llama directory (decoders, weights dequantized). Built in a staging directory and renamed
//! into place.

use crate::attach;
use crate::backbone::bert::ModelDir;
use crate::backbone::llama::LlamaModel;
use crate::core::Backbone;
use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;
use crate::io::save_tensors;
use crate::lm::LmTokenizer;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Every base tensor of the model under its HF name (merged deltas included).
pub fn base_tensors(model: &dyn Backbone) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for s in model.sites() {
        for (n, t) in s.params() {
            let name = if s.path().is_empty() { n.clone() } else { format!("{}.{n}", s.path()) };
            out.insert(name, t.clone());
        }
    }
    out
}

/// Merges every attached delta into the base weights and writes a plain HF model directory to
/// `out`: `model.safetensors` with the merged weights plus copies of the source directory's
/// other files (config, tokenizer). Fails, writing nothing, if a delta cannot be merged.
pub fn write_merged(model: &mut dyn Backbone, source: &ModelDir, out: &Path) -> Result<usize> {
    let n = attach::merge_all(model, true);
    let written = n.and_then(|n| {
        let tensors = base_tensors(model);
        let staging = StagedDir::new(out)?;
        copy_tree(&source.dir, staging.path(), &source.weights)?;
        let meta = [("format".to_string(), "pt".to_string())].into();
        save_tensors(&staging.path().join("model.safetensors"), &tensors, Some(meta))?;
        staging.commit(true)?;
        Ok(n)
    });
    // The model in memory is left as it was, written or not.
    attach::unmerge_all(model);
    written
}

/// Copies the files of `src` into `dst` (recursively), except `skip`.
fn copy_tree(src: &Path, dst: &Path, skip: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).map_err(|e| Error::io_op(src, "reading", e))? {
        let entry = entry.map_err(|e| Error::io_op(src, "reading", e))?;
        let p = entry.path();
        if p == skip || entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let target = dst.join(entry.file_name());
        if p.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| Error::io_op(&target, "creating", e))?;
            copy_tree(&p, &target, skip)?;
        } else {
            std::fs::copy(&p, &target).map_err(|e| Error::io_op(&target, "copying the model file to", e))?;
        }
    }
    Ok(())
}

/// Folds the mergeable deltas (LoRA, (IA)³, LN tuning) into f32 copies of the base weights and
/// writes an HF directory: config.json, model.safetensors (`dtype` F32, F16 or BF16),
/// tokenizer.json and tokenizer_config.json. Written to a staging directory and renamed into
/// place. Returns the number of sites that had deltas merged.
pub fn write_merged_decoder(model: &mut LlamaModel, dir: &Path, dtype: DType, tokenizer: &LmTokenizer) -> Result<usize> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::arg("--dtype", format!("{dtype:?} (expected f32, f16 or bf16)")));
    }
    for s in model.sites_mut() {
        s.dequantize()?;
    }
    let merged = crate::attach::merge_all(model, true)?;
    let mut tensors = std::collections::BTreeMap::new();
    for s in model.sites() {
        for (name, t) in s.params() {
            tensors.insert(format!("{}.{name}", s.path()), t.to_dtype(dtype)?);
        }
    }
    let c = &model.config;
    let dtype_name = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": dtype_name,
    });
    if let Some(b) = tokenizer.bos_id {
        config["bos_token_id"] = b.into();
    }
    if let Some(e) = tokenizer.eos_ids.first() {
        config["eos_token_id"] = (*e).into();
    }
    let staging = StagedDir::new(dir)?;
    save_tensors(&staging.path().join("model.safetensors"), &tensors, Some([("format".to_string(), "pt".to_string())].into()))?;
    crate::io::write_json_atomic(&staging.path().join("config.json"), &config)?;
    tokenizer.save_dir(staging.path())?;
    staging.commit(true)?;
    Ok(merged)
}
