//! llama.cpp's LoRA adapter files: a GGUF with `general.type` = `adapter`, `adapter.type` =
//! `lora`, `adapter.lora.alpha`, the base model's `general.architecture`, and per adapted matrix
//! `W` (llama.cpp's tensor name, `blk.3.attn_q.weight`) two tensors `W.lora_a` (r × in) and
//! `W.lora_b` (out × r), rows first. llama.cpp adds `alpha / r · B A x` (its `--lora` and
//! llama-cpp-python's `lora_path` load these files).
//!
//! For the Llama architecture, llama.cpp stores the query and key rows in its interleaved
//! rotary order; `B` of those projections is written in that order and read back from it.

use super::delta_dir::Loaded;
use crate::attach::{self, AttachOptions};
use crate::backbone::llama::{gguf_name_for, Arch, HF_MODEL_TYPES};
use crate::core::{Backbone, SiteKind};
use crate::delta::lora::LoraConfig;
use crate::delta::targets::{TargetModules, Targets};
use crate::delta::{DeltaConfig, DeltaSpec};
use crate::error::{Error, Result};
use crate::io::gguf::{unpermute_rotary_order, GgufFile};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

fn arch_of(model: &dyn Backbone) -> Result<Arch> {
    HF_MODEL_TYPES
        .iter()
        .find(|(n, _)| *n == model.model_type())
        .map(|(_, a)| *a)
        .ok_or_else(|| Error::Delta(format!("llama.cpp adapters need a decoder; this model is `{}`", model.model_type())))
}

/// The row order llama.cpp stores `site`'s output rows in, when it differs from HF's: row `i`
/// of ours is row `order[i]` of llama.cpp's.
fn rotary_order(arch: Arch, site: &str, out: usize, model: &dyn Backbone) -> Option<Vec<usize>> {
    if arch != Arch::Llama {
        return None;
    }
    let info = model.info();
    let head_dim = info.hidden_size / info.num_heads.max(1);
    if site.ends_with("self_attn.q_proj") {
        Some(unpermute_rotary_order(out, out / head_dim))
    } else if site.ends_with("self_attn.k_proj") {
        Some(unpermute_rotary_order(out, out / head_dim))
    } else {
        None
    }
}

/// Whether `path` is a llama.cpp adapter file (by extension; the contents are checked on load).
pub fn is_adapter_file(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|x| x == "gguf")
}

/// Writes LoRA group `spec` of `model` as a llama.cpp LoRA adapter GGUF at `path` (f32 tensors).
pub fn export(path: &Path, model: &dyn Backbone, spec: &DeltaSpec) -> Result<()> {
    let arch = arch_of(model)?;
    let DeltaConfig::Lora(c) = &spec.config else {
        return Err(Error::Delta(format!("llama.cpp adapters hold LoRA only; `{}` is {}", spec.name, spec.config.method())));
    };
    // llama.cpp scales by alpha / r; rsLoRA's alpha / √r is expressed through alpha.
    let alpha = (c.scaling() * c.r as f64) as f32;
    let mut tensors: BTreeMap<String, QTensor> = BTreeMap::new();
    for (site, param, var) in attach::group_vars(model, &spec.name) {
        let base = gguf_name_for(arch, &site);
        let t = var.as_tensor().to_dtype(candle_core::DType::F32)?.to_device(&Device::Cpu)?;
        let (name, t) = match param.as_str() {
            "lora_A.weight" => (format!("{base}.lora_a"), t),
            "lora_B.weight" => {
                let out = t.dim(0)?;
                let t = match rotary_order(arch, &site, out, model) {
                    Some(order) => {
                        let mut inv = vec![0u32; out];
                        for (i, &o) in order.iter().enumerate() {
                            inv[o] = i as u32;
                        }
                        t.index_select(&Tensor::new(inv, &Device::Cpu)?, 0)?
                    }
                    None => t,
                };
                (format!("{base}.lora_b"), t)
            }
            other => return Err(Error::Delta(format!("LoRA tensor `{other}` at {site} has no llama.cpp name"))),
        };
        tensors.insert(name, QTensor::quantize(&t.contiguous()?, GgmlDType::F32)?);
    }
    if tensors.is_empty() {
        return Err(Error::Delta(format!("delta `{}` has no tensors on this model", spec.name)));
    }
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(arch.gguf_name().into())),
        ("general.type", Value::String("adapter".into())),
        ("general.name", Value::String(format!("deltatune {}", spec.name))),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut buf, &meta_refs, &tensor_refs)
        .map_err(|e| Error::Gguf { file: path.to_path_buf(), msg: format!("writing: {e}") })?;
    crate::io::write_atomic(path, buf.get_ref())
}

/// Attaches the llama.cpp LoRA adapter at `path` to `model` as a LoRA delta named `lora`.
pub fn load(path: &Path, model: &mut dyn Backbone) -> Result<Loaded> {
    let gerr = |msg: String| Error::Gguf { file: path.to_path_buf(), msg };
    let arch = arch_of(model)?;
    let mut g = GgufFile::open(path)?;
    if g.string("general.type").ok() != Some("adapter") || g.string("adapter.type").ok() != Some("lora") {
        return Err(gerr("not a llama.cpp LoRA adapter (expected general.type = adapter and adapter.type = lora)".into()));
    }
    let file_arch = g.string("general.architecture")?.to_string();
    if file_arch != arch.gguf_name() {
        return Err(gerr(format!("adapter for architecture `{file_arch}`, but the model is `{}`", arch.gguf_name())));
    }
    // llama.cpp's name of every linear site → its HF path.
    let by_gguf: HashMap<String, String> = model
        .sites()
        .iter()
        .filter(|s| s.kind() == SiteKind::Linear)
        .map(|s| (gguf_name_for(arch, s.path()), s.path().to_string()))
        .collect();
    let mut pairs: BTreeMap<String, (String, Option<String>)> = BTreeMap::new(); // hf -> (a, b)
    for name in g.tensor_names() {
        let (base, is_a) = match (name.strip_suffix(".lora_a"), name.strip_suffix(".lora_b")) {
            (Some(b), _) => (b, true),
            (_, Some(b)) => (b, false),
            _ => return Err(gerr(format!("tensor `{name}` is neither a `.lora_a` nor a `.lora_b` tensor"))),
        };
        let hf = by_gguf.get(base).ok_or_else(|| gerr(format!("tensor `{name}`: the model has no matrix `{base}`")))?;
        let e = pairs.entry(hf.clone()).or_insert((String::new(), None));
        if is_a {
            e.0 = name.to_string();
        } else {
            e.1 = Some(name.to_string());
        }
    }
    let mut rank = None;
    let mut loaded: Vec<(String, Tensor, Tensor)> = Vec::new();
    for (hf, (a_name, b_name)) in &pairs {
        let b_name = b_name.as_ref().ok_or_else(|| gerr(format!("`{a_name}` has no matching `.lora_b` tensor")))?;
        if a_name.is_empty() {
            return Err(gerr(format!("`{b_name}` has no matching `.lora_a` tensor")));
        }
        let (a_dims, _) = g.tensor_info(a_name).ok_or_else(|| gerr(format!("tensor `{a_name}` missing")))?;
        let (b_dims, _) = g.tensor_info(b_name).ok_or_else(|| gerr(format!("tensor `{b_name}` missing")))?;
        if a_dims.len() != 2 || b_dims.len() != 2 || a_dims[0] != b_dims[1] {
            return Err(gerr(format!("`{a_name}` {a_dims:?} and `{b_name}` {b_dims:?} are not r × in and out × r")));
        }
        let r = a_dims[0];
        if *rank.get_or_insert(r) != r {
            return Err(gerr(format!("`{a_name}` has rank {r}, others {} (one rank per adapter is supported)", rank.unwrap_or(0))));
        }
        let a = g.tensor(a_name, &a_dims)?.dequantize(&Device::Cpu)?;
        let mut b = g.tensor(b_name, &b_dims)?.dequantize(&Device::Cpu)?;
        if let Some(order) = rotary_order(arch, hf, b_dims[0], model) {
            let idx: Vec<u32> = order.into_iter().map(|i| i as u32).collect();
            b = b.index_select(&Tensor::new(idx, &Device::Cpu)?, 0)?;
        }
        loaded.push((hf.clone(), a, b));
    }
    let r = rank.ok_or_else(|| gerr("the adapter holds no LoRA tensors".into()))?;
    let alpha = match g.f64_opt("adapter.lora.alpha")? {
        Some(a) if a > 0.0 => a,
        _ => r as f64, // llama.cpp: no alpha means a scale of 1
    };
    let config = LoraConfig { r, lora_alpha: alpha, ..LoraConfig::default() };
    let targets = Targets { target_modules: Some(TargetModules::List(pairs.keys().cloned().collect())), ..Default::default() };
    let spec = DeltaSpec { name: "lora".into(), config: DeltaConfig::Lora(config), targets, extra: BTreeMap::new() };
    let specs = vec![spec];
    attach::attach(model, &specs, AttachOptions::default())?;
    let fill = || -> Result<()> {
        let by_site: HashMap<&str, (&Tensor, &Tensor)> = loaded.iter().map(|(s, a, b)| (s.as_str(), (a, b))).collect();
        for (site, param, var) in attach::group_vars(model, "lora") {
            let (a, b) = by_site.get(site.as_str()).ok_or_else(|| gerr(format!("no tensors for {site}")))?;
            let t = if param == "lora_A.weight" { *a } else { *b };
            if t.dims() != var.dims() {
                return Err(gerr(format!("{site} {param}: shape {:?}, the model needs {:?}", t.dims(), var.dims())));
            }
            var.set(&t.to_device(var.device())?)?;
        }
        Ok(())
    };
    match fill() {
        Ok(()) => Ok(Loaded { specs, extra_tensors: BTreeMap::new(), meta: serde_json::Map::new(), warnings: Vec::new() }),
        Err(e) => {
            attach::detach_named(model, &specs);
            Err(e)
        }
    }
}
