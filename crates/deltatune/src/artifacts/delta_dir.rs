//! deltatune's own delta files: a directory with `delta_config.json` (format version, the backbone's
//! fingerprint, the delta specs, optional caller metadata such as a task head's config) and
//! `delta.safetensors` (only the delta tensors, `deltas.<name>.<site path>.<param>`, plus caller
//! tensors such as `head.weight`). A file is about 4 bytes per trainable parameter plus a small
//! header. The directory is written in a staging directory and renamed into place.

use crate::attach::{self, AttachOptions};
use crate::core::Backbone;
use crate::delta::DeltaSpec;
use crate::error::{Error, Result};
use crate::io::atomic::{write_json_atomic, StagedDir};
use crate::io::{save_tensors, TensorFile};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "delta_config.json";
pub const WEIGHTS_FILE: &str = "delta.safetensors";
const FORMAT: &str = "deltatune-delta";
const VERSION: u64 = 1;

/// Identifies the backbone a delta was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackboneRef {
    pub model_type: String,
    pub fingerprint: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub total_params: usize,
}

impl BackboneRef {
    pub fn of(model: &dyn Backbone) -> Self {
        let info = model.info();
        BackboneRef {
            model_type: model.model_type().to_string(),
            fingerprint: model.fingerprint().to_string(),
            hidden_size: info.hidden_size,
            num_layers: info.num_layers,
            total_params: model.num_params(),
        }
    }
}

/// What [`load`] returns besides attaching the deltas.
#[derive(Debug)]
pub struct Loaded {
    pub specs: Vec<DeltaSpec>,
    /// Tensors saved by the caller next to the deltas (e.g. `head.weight`).
    pub extra_tensors: BTreeMap<String, Tensor>,
    /// Caller metadata saved with [`save`] (e.g. the task head's config).
    pub meta: Map<String, Value>,
    pub warnings: Vec<String>,
}

/// Saves the deltas named in `specs` (with their current values) into directory `dir`, built
/// beside it and swapped into place (an existing `dir` is replaced: callers apply the output
/// policy, [`crate::io::atomic::check_output`], before any work).
pub fn save(
    dir: &Path,
    model: &dyn Backbone,
    specs: &[DeltaSpec],
    extra_tensors: &BTreeMap<String, Tensor>,
    meta: &Map<String, Value>,
) -> Result<()> {
    let staging = StagedDir::new(dir)?;
    write_into(staging.path(), model, specs, extra_tensors, meta)?;
    staging.commit(true)
}

/// Writes the delta's two files into the existing directory `dir` (a caller's staging directory).
pub fn write_into(
    dir: &Path,
    model: &dyn Backbone,
    specs: &[DeltaSpec],
    extra_tensors: &BTreeMap<String, Tensor>,
    meta: &Map<String, Value>,
) -> Result<()> {
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, var) in attach::saved_vars(model) {
        let group = name.split('.').next().unwrap_or_default();
        if names.contains(&group) {
            tensors.insert(format!("deltas.{name}"), var.as_tensor().clone());
        }
    }
    for (k, t) in extra_tensors {
        if k.starts_with("deltas.") {
            return Err(Error::Delta(format!("extra tensor name `{k}` is reserved")));
        }
        tensors.insert(k.clone(), t.clone());
    }
    let mut config = Map::new();
    config.insert("format".into(), FORMAT.into());
    config.insert("version".into(), VERSION.into());
    config.insert("backbone".into(), serde_json::to_value(BackboneRef::of(model)).map_err(|e| Error::Delta(e.to_string()))?);
    config.insert("deltas".into(), Value::Array(specs.iter().map(|s| s.to_json()).collect()));
    for (k, v) in meta {
        config.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let meta_st = [("format".to_string(), "pt".to_string()), ("deltatune".to_string(), VERSION.to_string())].into();
    save_tensors(&dir.join(WEIGHTS_FILE), &tensors, Some(meta_st))?;
    write_json_atomic(&dir.join(CONFIG_FILE), &Value::Object(config))
}

/// Whether `dir` holds a deltatune delta.
pub fn is_delta_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// Reads the config of a saved delta without attaching anything.
pub fn read_config(dir: &Path) -> Result<(BackboneRef, Vec<DeltaSpec>, Map<String, Value>, Vec<String>)> {
    let path = dir.join(CONFIG_FILE);
    let v = crate::io::read_json(&path)?;
    let origin = path.display().to_string();
    let obj = v.as_object().ok_or_else(|| Error::Config { file: path.clone(), msg: "expected a JSON object".into() })?;
    if obj.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(Error::Config { file: path.clone(), msg: format!("not a deltatune delta (missing \"format\": \"{FORMAT}\")") });
    }
    let backbone: BackboneRef = serde_json::from_value(obj.get("backbone").cloned().unwrap_or(Value::Null))
        .map_err(|e| Error::Config { file: path.clone(), msg: format!("backbone: {e}") })?;
    let mut warnings = Vec::new();
    if let Some(ver) = obj.get("version").and_then(|v| v.as_u64()) {
        if ver > VERSION {
            warnings.push(format!("{origin}: written by a newer deltatune (format version {ver}); unknown fields are ignored"));
        }
    }
    let deltas = obj.get("deltas").and_then(|d| d.as_array()).ok_or_else(|| Error::MissingField { file: path.clone(), field: "deltas".into() })?;
    let mut specs = Vec::new();
    for (i, d) in deltas.iter().enumerate() {
        let (s, w) = DeltaSpec::from_json(d, &format!("{origin} (delta {i})"))?;
        specs.push(s);
        warnings.extend(w);
    }
    let meta: Map<String, Value> = obj
        .iter()
        .filter(|(k, _)| !["format", "version", "backbone", "deltas"].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((backbone, specs, meta, warnings))
}

/// Attaches the deltas saved in `dir` to `model` and loads their values. Refuses a delta trained on
/// a different backbone. On error the model is left as it was.
pub fn load(dir: &Path, model: &mut dyn Backbone, opts: AttachOptions) -> Result<Loaded> {
    load_renamed(dir, model, opts, None)
}

/// Like [`load`], with the delta groups renamed after `name` (one group: `name`; several:
/// `name-<group>`), so that several saved deltas whose groups share a name (`lora`) can sit on one
/// model. The returned specs carry the new names.
pub fn load_as(dir: &Path, model: &mut dyn Backbone, opts: AttachOptions, name: &str) -> Result<Loaded> {
    load_renamed(dir, model, opts, Some(name))
}

fn load_renamed(dir: &Path, model: &mut dyn Backbone, opts: AttachOptions, rename: Option<&str>) -> Result<Loaded> {
    if !dir.is_dir() {
        return Err(Error::NotFound { path: dir.to_path_buf(), what: "delta directory".into() });
    }
    let (backbone, mut specs, meta, warnings) = read_config(dir)?;
    // New group name -> the name its tensors are saved under.
    let mut saved_as = BTreeMap::new();
    if let Some(base) = rename {
        let several = specs.len() > 1;
        for s in &mut specs {
            let new = if several { format!("{base}-{}", s.name) } else { base.to_string() };
            saved_as.insert(new.clone(), s.name.clone());
            s.name = new;
        }
    }
    let here = BackboneRef::of(model);
    if backbone.fingerprint != here.fingerprint {
        return Err(Error::Delta(format!(
            "{}: this delta was trained on a different backbone ({}, {} layers, hidden {}, {} parameters, fingerprint {}); \
             the loaded model is {}, {} layers, hidden {}, {} parameters, fingerprint {}",
            dir.display(),
            backbone.model_type,
            backbone.num_layers,
            backbone.hidden_size,
            backbone.total_params,
            backbone.fingerprint,
            here.model_type,
            here.num_layers,
            here.hidden_size,
            here.total_params,
            here.fingerprint
        )));
    }
    let file = TensorFile::load(&dir.join(WEIGHTS_FILE), model.device())?;
    attach::attach(model, &specs, opts)?;
    let result = fill(model, &specs, &file, &saved_as);
    match result {
        Ok(extra_tensors) => Ok(Loaded { specs, extra_tensors, meta, warnings }),
        Err(e) => {
            attach::detach_named(model, &specs);
            Err(e)
        }
    }
}

/// Copies tensors `deltas.<name>` of `file` into the attached deltas of `specs`; returns the
/// non-delta tensors. `saved_as` maps a renamed group to the name its tensors carry in the file.
pub(crate) fn fill(model: &dyn Backbone, specs: &[DeltaSpec], file: &TensorFile, saved_as: &BTreeMap<String, String>) -> Result<BTreeMap<String, Tensor>> {
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut used = std::collections::BTreeSet::new();
    for (name, var) in attach::saved_vars(model) {
        let group = name.split('.').next().unwrap_or_default();
        if !names.contains(&group) {
            continue;
        }
        let key = match saved_as.get(group) {
            Some(old) => format!("deltas.{old}{}", &name[group.len()..]),
            None => format!("deltas.{name}"),
        };
        let t = file.get_f32(&key, var.dims())?;
        var.set(&t.to_device(var.device())?)?;
        used.insert(key);
    }
    let mut extra = BTreeMap::new();
    for k in file.names() {
        if used.contains(k) {
            continue;
        }
        if k.starts_with("deltas.") {
            return Err(Error::Delta(format!(
                "{}: tensor `{k}` belongs to no attached delta (the config and the weights disagree)",
                file.path.display()
            )));
        }
        extra.insert(k.to_string(), file.get(k)?.clone());
    }
    Ok(extra)
}
