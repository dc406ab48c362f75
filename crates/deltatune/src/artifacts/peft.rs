//! PEFT's adapter format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! The file layout, key prefixes and the classifier head are handled here; each method maps its
//! own config fields and tensor keys ([`crate::delta::Method::from_peft`], `to_peft`, `peft_key`).
//! Keys may carry PEFT's prefixes (`base_model.model.`, `base_model.model.bert.`, `base_model.`)
//! or none. A saved classifier head (`classifier.weight`/`bias`, from `modules_to_save`) is
//! returned to the caller. Export writes PEFT's key names, every config field and `format: pt`
//! metadata, so PEFT loads our adapters.

use super::delta_dir::Loaded;
use crate::attach::{self, AttachOptions};
use crate::core::Backbone;
use crate::delta::peft_fields::{PeftIn, PeftOut};
use crate::delta::{DeltaConfig, DeltaSpec};
use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;
use crate::io::{read_json, save_tensors, TensorFile};
use candle_core::Tensor;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Whether `dir` holds a PEFT adapter.
pub fn is_peft_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

const PREFIXES: &[&str] = &["base_model.model.bert.", "base_model.model.roberta.", "base_model.model.", "base_model."];

fn strip(key: &str) -> &str {
    PREFIXES.iter().find_map(|p| key.strip_prefix(p)).unwrap_or(key)
}

/// Translates a PEFT config into our spec (checking it against the model).
pub fn spec_from_config(path: &Path, model: &dyn Backbone) -> Result<DeltaSpec> {
    let v = read_json(path)?;
    let obj = v.as_object().ok_or_else(|| Error::Config { file: path.into(), msg: "expected a JSON object".into() })?;
    let peft_type = obj
        .get("peft_type")
        .and_then(|p| p.as_str())
        .ok_or_else(|| Error::MissingField { file: path.into(), field: "peft_type".into() })?;
    let p = PeftIn { obj, path, info: model.info(), model_type: model.model_type() };
    let (config, targets) = DeltaConfig::from_peft(peft_type, &p)?;
    let name = config.method().to_string();
    Ok(DeltaSpec { name, config, targets, extra: BTreeMap::new() })
}

/// Attaches the PEFT adapter in `dir` to `model` with its values. Returns any non-adapter tensors
/// (a `classifier.*` head from `modules_to_save`) as extra tensors with the prefixes removed.
pub fn load(dir: &Path, model: &mut dyn Backbone, name: Option<&str>) -> Result<Loaded> {
    if !dir.is_dir() {
        return Err(Error::NotFound { path: dir.to_path_buf(), what: "adapter directory".into() });
    }
    let mut spec = spec_from_config(&dir.join(CONFIG_FILE), model)?;
    if let Some(n) = name {
        spec.name = n.to_string();
    }
    let file = TensorFile::load(&dir.join(WEIGHTS_FILE), model.device())?;
    let specs = vec![spec];
    attach::attach(model, &specs, AttachOptions::default())?;
    match fill(model, &specs[0], &file) {
        Ok(extra_tensors) => Ok(Loaded { specs, extra_tensors, meta: Map::new(), warnings: Vec::new() }),
        Err(e) => {
            attach::detach_named(model, &specs);
            Err(e)
        }
    }
}

/// Substrings of PEFT's adapter tensor names: such a tensor left over after filling the attached
/// delta means the config and the weights disagree.
const ADAPTER_MARKERS: &[&str] = &["lora_", "ia3_l", "vera_", "hada_", "lokr_", "oft_", "boft_"];

fn fill(model: &dyn Backbone, spec: &DeltaSpec, file: &TensorFile) -> Result<BTreeMap<String, Tensor>> {
    let mut by_key: BTreeMap<String, String> = BTreeMap::new(); // stripped -> original
    for k in file.names() {
        by_key.insert(strip(k).to_string(), k.to_string());
    }
    let mut used = BTreeSet::new();
    for (site, param, var) in attach::group_vars(model, &spec.name) {
        // Tensors PEFT does not store keep their built value; stored ones may be reshaped (AdaLoRA's rank trimming).
        let Some(shape) = spec.config.peft_shape(&site, &param, var.dims()) else { continue };
        let key = spec.config.peft_key(&site, &param);
        let prefix = if site.is_empty() { "base_model." } else { "base_model.model." };
        let original = by_key.get(&key).ok_or_else(|| Error::MissingTensor { file: file.path.clone(), key: format!("{prefix}{key}") })?;
        let t = spec.config.from_peft_tensor(&site, &param, file.get_f32(original, &shape)?)?;
        var.set(&t.to_device(var.device())?)?;
        used.insert(original.clone());
    }
    let mut extra = BTreeMap::new();
    for k in file.names() {
        if used.contains(k) {
            continue;
        }
        let s = strip(k);
        let s = s.strip_suffix(".modules_to_save.default.weight").map(|p| format!("{p}.weight")).unwrap_or_else(|| s.to_string());
        if ADAPTER_MARKERS.iter().any(|m| s.contains(m)) || s == "prompt_embeddings" {
            return Err(Error::Delta(format!(
                "{}: adapter tensor `{k}` matches no targeted module (target_modules and the weights disagree)",
                file.path.display()
            )));
        }
        extra.insert(s, file.get(k)?.clone());
    }
    Ok(extra)
}

/// Writes delta group `spec` of `model` as a PEFT adapter directory (methods PEFT can load).
/// `base_model` goes into `base_model_name_or_path`.
pub fn export(dir: &Path, model: &dyn Backbone, spec: &DeltaSpec, base_model: &str, extra_tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let modules_to_save = if extra_tensors.keys().any(|k| k.starts_with("classifier.")) { json!(["classifier"]) } else { Value::Null };
    let out = PeftOut { base_model, model_type: model.model_type(), modules_to_save };
    if spec.config.peft_type().is_none() {
        return Err(Error::Delta(format!("PEFT has no format for `{}` ({})", spec.name, spec.config.method())));
    }
    let mut config = spec.config.to_peft(&spec.targets, &out).map_err(|e| Error::Delta(format!("exporting `{}` to PEFT: {e}", spec.name)))?;
    let mut group: Vec<(String, String, Tensor)> =
        attach::group_vars(model, &spec.name).into_iter().map(|(site, param, var)| (site, param, var.as_tensor().clone())).collect();
    spec.config.to_peft_tensors(&mut group, &mut config).map_err(|e| Error::Delta(format!("exporting `{}` to PEFT: {e}", spec.name)))?;
    let mut tensors = BTreeMap::new();
    for (site, param, t) in group {
        // Site tensors live under the wrapped model; tensors shared by the group (VeRA's
        // projections) belong to PEFT's tuner model itself: `base_model.vera_A`.
        let prefix = if site.is_empty() { "base_model." } else { "base_model.model." };
        tensors.insert(format!("{prefix}{}", spec.config.peft_key(&site, &param)), t);
    }
    for (k, t) in extra_tensors {
        tensors.insert(format!("base_model.model.{k}"), t.clone());
    }
    let staging = StagedDir::new(dir)?;
    let meta = [("format".to_string(), "pt".to_string())].into();
    save_tensors(&staging.path().join(WEIGHTS_FILE), &tensors, Some(meta))?;
    // PEFT writes its config with sorted keys and an indent of 2.
    let text = serde_json::to_string_pretty(&sort_keys(config)).map_err(|e| Error::Delta(e.to_string()))?;
    crate::io::write_atomic(&staging.path().join(CONFIG_FILE), text.as_bytes())?;
    staging.commit(true)
}

fn sort_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<String, Value> = m.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        other => other,
    }
}
