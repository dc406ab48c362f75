//! Merged models: every mergeable delta folded into the base weights and written as a plain
//! model directory that loads without deltatune — an HF BERT-family directory (encoders) or an
//! HF Llama directory (decoders, weights dequantized), or for GGUF decoders a GGUF model file that
//! llama.cpp loads. Built in a staging directory and renamed
//! into place.

use crate::attach;
use crate::backbone::bert::ModelDir;
use crate::backbone::llama::{gguf_name_for, Arch, LlamaModel};
use crate::core::{Backbone, SiteKind};
use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;
use crate::io::gguf::{unpermute_rotary_order, GgufFile};
use crate::io::save_tensors;
use crate::lm::LmTokenizer;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
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
/// writes an HF directory of the model's architecture: config.json, model.safetensors (`dtype`
/// F32, F16 or BF16), and with a tokenizer tokenizer.json and tokenizer_config.json. Written to a staging directory and renamed into
/// place. Returns the number of sites that had deltas merged.
pub fn write_merged_decoder(model: &mut LlamaModel, dir: &Path, dtype: DType, tokenizer: Option<&LmTokenizer>) -> Result<usize> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::arg("--dtype", format!("{dtype:?} (expected f32, f16 or bf16)")));
    }
    for s in model.sites_mut() {
        s.dequantize()?;
    }
    let merged = crate::attach::merge_all(model, true)?;
    let c = &model.config;
    let mut tensors = std::collections::BTreeMap::new();
    for s in model.sites() {
        for (name, t) in s.params() {
            // HF Gemma stores a norm's weight w and multiplies by 1 + w; ours is the multiplier.
            let t = if c.arch == Arch::Gemma3 && s.kind() == SiteKind::RmsNorm { (t - 1.0)? } else { t.clone() };
            tensors.insert(format!("{}.{name}", s.path()), t.to_dtype(dtype)?);
        }
    }
    let dtype_name = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let (architecture, model_type) = match c.arch {
        Arch::Llama if c.sliding_window.is_some() => ("MistralForCausalLM", "mistral"),
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Arch::Phi3 => ("Phi3ForCausalLM", "phi3"),
    };
    let layer_types: Vec<&str> =
        c.sliding_layers.iter().map(|&s| if s && c.sliding_window.is_some() { "sliding_attention" } else { "full_attention" }).collect();
    let mut config = serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
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
        "attention_bias": c.attention_bias,
        "mlp_bias": false,
        "sliding_window": c.sliding_window,
        "layer_types": layer_types,
        "torch_dtype": dtype_name,
    });
    match c.arch {
        Arch::Gemma3 => {
            config["hidden_activation"] = "gelu_pytorch_tanh".into();
            config["hidden_act"] = "gelu_pytorch_tanh".into();
            // transformers' config class wants an integer here.
            let qpas = c.query_pre_attn_scalar;
            config["query_pre_attn_scalar"] = if qpas.fract() == 0.0 { (qpas as i64).into() } else { qpas.into() };
            config["rope_local_base_freq"] = c.rope_local_theta.into();
        }
        Arch::Qwen2 | Arch::Qwen3 => config["use_sliding_window"] = c.sliding_window.is_some().into(),
        Arch::Phi3 => config["original_max_position_embeddings"] = c.max_position_embeddings.into(),
        Arch::Llama => {}
    }
    if let Some(t) = tokenizer {
        if let Some(b) = t.bos_id {
            config["bos_token_id"] = b.into();
        }
        if let Some(e) = t.eos_ids.first() {
            config["eos_token_id"] = (*e).into();
        }
    }
    let staging = StagedDir::new(dir)?;
    save_tensors(&staging.path().join("model.safetensors"), &tensors, Some([("format".to_string(), "pt".to_string())].into()))?;
    crate::io::write_json_atomic(&staging.path().join("config.json"), &config)?;
    if let Some(t) = tokenizer {
        t.save_dir(staging.path())?;
    }
    staging.commit(true)?;
    Ok(merged)
}

/// Weight types of a merged GGUF's matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GgufWeights {
    /// Every matrix in F16 (vectors stay F32), as llama.cpp's converter writes an F16 model.
    F16,
    /// Every matrix in Q8_0 (F16 where a row is not a whole number of 32-value blocks).
    Q8_0,
    /// The base file's own type for every tensor: tensors without a merged delta are copied byte
    /// for byte, merged ones re-quantized into their original type.
    Base,
}

impl GgufWeights {
    /// `f16`, `q8_0` or `base`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(GgufWeights::F16),
            "q8_0" => Ok(GgufWeights::Q8_0),
            "base" => Ok(GgufWeights::Base),
            other => Err(Error::arg("--dtype", format!("`{other}` (a merged GGUF is f16, q8_0, or base: the base file's own types)"))),
        }
    }

    /// The type a tensor of type `ty` and shape `dims` (rows first) is written in.
    fn target(self, ty: GgmlDType, dims: &[usize]) -> GgmlDType {
        match self {
            GgufWeights::Base => ty,
            _ if dims.len() < 2 => ty,
            GgufWeights::F16 => GgmlDType::F16,
            GgufWeights::Q8_0 if dims.last().is_some_and(|c| c % GgmlDType::Q8_0.block_size() == 0) => GgmlDType::Q8_0,
            GgufWeights::Q8_0 => GgmlDType::F16,
        }
    }

    /// llama.cpp's `general.file_type` for a whole-file type (`None`: keep the base's).
    fn file_type(self) -> Option<u32> {
        match self {
            GgufWeights::F16 => Some(1),
            GgufWeights::Q8_0 => Some(7),
            GgufWeights::Base => None,
        }
    }
}

/// Folds every attached delta (LoRA, (IA)³, LN tuning) into the weights of the GGUF decoder
/// loaded from `base` and writes a complete GGUF model file to `out` that llama.cpp loads: the
/// base file's metadata (architecture, tokenizer, chat template) and every tensor, merged ones
/// replaced, matrices in `weights`' types. Only the sites with deltas are dequantized. Written
/// to a temporary file beside `out` and renamed into place. Returns the number of merged sites.
/// The model in memory is left unmerged (its merged sites stay dequantized).
pub fn write_merged_gguf(model: &mut LlamaModel, base: &Path, out: &Path, weights: GgufWeights) -> Result<usize> {
    let arch = model.config.arch;
    let gerr = |msg: String| Error::Gguf { file: base.to_path_buf(), msg };
    let mut g = GgufFile::open(base)?;
    if g.string("general.architecture")? != arch.gguf_name() {
        return Err(gerr(format!("is not the model's base (architecture `{}`, the model is `{}`)", g.string("general.architecture")?, arch.gguf_name())));
    }
    for s in model.sites_mut() {
        if s.has_active() {
            s.dequantize()?;
        }
    }
    let merged = attach::merge_all(model, true);
    // The merged tensors under their GGUF names, in the file's row order.
    let replaced = merged.and_then(|n| {
        let c = &model.config;
        let mut replaced: HashMap<String, Tensor> = HashMap::new();
        for s in model.sites().into_iter().filter(|s| s.is_merged()) {
            let hf = s.path();
            for (param, t) in s.params() {
                let name = match param.as_str() {
                    "weight" => gguf_name_for(arch, hf),
                    "bias" => gguf_name_for(arch, hf).replace(".weight", ".bias"),
                    other => return Err(Error::Delta(format!("{hf}.{other} has no GGUF tensor name"))),
                };
                let rotary_heads = match () {
                    _ if !arch.gguf_permutes_rotary() => None,
                    _ if hf.ends_with("self_attn.q_proj") => Some(c.num_attention_heads),
                    _ if hf.ends_with("self_attn.k_proj") => Some(c.num_key_value_heads),
                    _ => None,
                };
                let t = match rotary_heads {
                    // Row i of ours is row order[i] of the file's: put it back there.
                    Some(heads) => {
                        let rows = t.dim(0)?;
                        let mut inv = vec![0u32; rows];
                        for (i, o) in unpermute_rotary_order(rows, heads).into_iter().enumerate() {
                            inv[o] = i as u32;
                        }
                        t.index_select(&Tensor::new(inv, t.device())?, 0)?
                    }
                    None => t.clone(),
                };
                if g.tensor_info(&name).is_none() {
                    return Err(gerr(format!("has no tensor `{name}` for the merged {hf}.{param}")));
                }
                replaced.insert(name, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
            }
        }
        Ok((n, replaced))
    });
    attach::unmerge_all(model);
    let (n, mut replaced) = replaced?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let names: Vec<String> = g.tensor_names().into_iter().map(String::from).collect();
    for name in names {
        let (dims, ty) = g.tensor_info(&name).ok_or_else(|| gerr(format!("tensor `{name}` vanished")))?;
        let target = weights.target(ty, &dims);
        let requant = |t: &Tensor| QTensor::quantize(&t.contiguous()?, target).map_err(|e| gerr(format!("quantizing `{name}` to {target:?}: {e}")));
        let q = match replaced.remove(&name) {
            Some(t) => requant(&t)?,
            None => {
                let q = g.tensor(&name, &dims)?;
                if target == ty { q } else { requant(&q.dequantize(&Device::Cpu)?)? }
            }
        };
        tensors.push((name, q));
    }
    let mut meta: Vec<(String, Value)> = g
        .metadata()
        .iter()
        // The writer aligns tensor data to 32 bytes and says nothing else about it.
        .filter(|(k, v)| k.as_str() != "general.alignment" || matches!(v, Value::U32(32)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(ft) = weights.file_type() {
        meta.retain(|(k, _)| k != "general.file_type");
        meta.push(("general.file_type".into(), Value::U32(ft)));
    }
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    crate::io::atomic::write_atomic_with(out, |f| {
        let mut w = std::io::BufWriter::new(f);
        candle_core::quantized::gguf_file::write(&mut w, &meta_refs, &tensor_refs).map_err(std::io::Error::other)?;
        std::io::Write::flush(&mut w)
    })?;
    Ok(n)
}
