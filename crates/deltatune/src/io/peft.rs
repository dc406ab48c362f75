//! PEFT's adapter format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Loading supports LoRA, IA3, prefix tuning and prompt tuning; keys may carry PEFT's prefixes
//! (`base_model.model.`, `base_model.model.bert.`, `base_model.`) or none. A saved classifier head
//! (`classifier.weight`/`bias`, from `modules_to_save`) is returned to the caller. Export writes
//! LoRA and IA3 exactly as PEFT 0.21 does (its key names, every config field, `format: pt`
//! metadata), so PEFT users can load our adapters.

use crate::attach::{self, AttachOptions};
use crate::backbone::Backbone;
use crate::delta::store::{detach_named, Loaded};
use crate::delta::{DeltaConfig, DeltaSpec, Ia3Config, LoraConfig, PrefixConfig, PromptConfig, PromptInit, TargetModules, Targets};
use crate::error::{Error, Result};
use crate::io::{read_json, save_tensors, TensorFile};
use candle_core::Tensor;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
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

fn targets_of(v: Option<&Value>, file: &Path, field: &str) -> Result<Option<TargetModules>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(TargetModules::Regex(s.clone()))),
        Some(Value::Array(a)) => {
            let mut l: Vec<String> = a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect();
            l.sort();
            Ok(Some(TargetModules::List(l)))
        }
        Some(other) => Err(Error::Config { file: file.to_path_buf(), msg: format!("`{field}` must be a string or a list, got {other}") }),
    }
}

fn num(obj: &Map<String, Value>, key: &str, file: &Path) -> Result<f64> {
    obj.get(key)
        .and_then(|v| v.as_f64())
        .ok_or_else(|| Error::MissingField { file: file.to_path_buf(), field: key.into() })
}

/// Translates a PEFT config into our spec (checking it against the model).
pub fn spec_from_config(path: &Path, model: &dyn Backbone) -> Result<DeltaSpec> {
    let v = read_json(path)?;
    let obj = v.as_object().ok_or_else(|| Error::Config { file: path.into(), msg: "expected a JSON object".into() })?;
    let peft_type = obj
        .get("peft_type")
        .and_then(|p| p.as_str())
        .ok_or_else(|| Error::MissingField { file: path.into(), field: "peft_type".into() })?;
    let bad = |msg: String| Error::Config { file: path.into(), msg };
    let info = model.info();
    // PEFT's token_dim is the hidden size for prompts and the key width for prefixes (grouped-query
    // attention: num_key_value_heads × head_dim).
    let check_dims = |obj: &Map<String, Value>, token_dim: usize| -> Result<()> {
        for (k, want) in [("token_dim", token_dim), ("num_layers", info.num_layers)] {
            if let Some(got) = obj.get(k).and_then(|x| x.as_u64()) {
                if got as usize != want {
                    return Err(bad(format!("{k} is {got} but the model has {want}")));
                }
            }
        }
        Ok(())
    };
    let (config, targets) = match peft_type {
        "LORA" => {
            for (k, what) in [("use_dora", "DoRA"), ("lora_bias", "lora_bias")] {
                if obj.get(k).and_then(|x| x.as_bool()) == Some(true) {
                    return Err(bad(format!("{what} adapters are not supported")));
                }
            }
            for k in ["rank_pattern", "alpha_pattern"] {
                if obj.get(k).and_then(|x| x.as_object()).is_some_and(|m| !m.is_empty()) {
                    return Err(bad(format!("`{k}` (per-module ranks) is not supported")));
                }
            }
            if let Some(b) = obj.get("bias").and_then(|x| x.as_str()) {
                if b != "none" {
                    return Err(bad(format!("bias=\"{b}\" is not supported; attach a bitfit delta alongside")));
                }
            }
            let layers = match obj.get("layers_to_transform") {
                Some(Value::Number(n)) => n.as_u64().map(|u| vec![u as usize]),
                Some(Value::Array(a)) => Some(a.iter().filter_map(|x| x.as_u64().map(|u| u as usize)).collect()),
                _ => None,
            };
            let cfg = LoraConfig {
                r: num(obj, "r", path)? as usize,
                lora_alpha: num(obj, "lora_alpha", path)?,
                lora_dropout: obj.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32,
                use_rslora: obj.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
                fan_in_fan_out: false,
                ..Default::default()
            };
            let t = Targets {
                target_modules: targets_of(obj.get("target_modules"), path, "target_modules")?,
                layers_to_transform: layers,
                exclude_modules: targets_of(obj.get("exclude_modules"), path, "exclude_modules")?,
            };
            (DeltaConfig::Lora(cfg), t)
        }
        "IA3" => {
            let cfg = Ia3Config {
                feedforward_modules: targets_of(obj.get("feedforward_modules"), path, "feedforward_modules")?,
                init_ia3_weights: true,
            };
            let t = Targets {
                target_modules: targets_of(obj.get("target_modules"), path, "target_modules")?,
                layers_to_transform: None,
                exclude_modules: targets_of(obj.get("exclude_modules"), path, "exclude_modules")?,
            };
            (DeltaConfig::Ia3(cfg), t)
        }
        "PREFIX_TUNING" => {
            check_dims(obj, info.kv_width())?;
            // PEFT saves the (projected) table only, so it always loads as a plain table.
            let cfg = PrefixConfig { num_virtual_tokens: num(obj, "num_virtual_tokens", path)? as usize, prefix_projection: false, encoder_hidden_size: None };
            (DeltaConfig::Prefix(cfg), Targets::default())
        }
        "PROMPT_TUNING" => {
            check_dims(obj, info.hidden_size)?;
            let cfg = PromptConfig {
                num_virtual_tokens: num(obj, "num_virtual_tokens", path)? as usize,
                prompt_tuning_init: PromptInit::Random,
                ..Default::default()
            };
            (DeltaConfig::Prompt(cfg), Targets::default())
        }
        other => return Err(bad(format!("peft_type `{other}` is not supported (LORA, IA3, PREFIX_TUNING, PROMPT_TUNING)"))),
    };
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
            detach_named(model, &specs);
            Err(e)
        }
    }
}

fn fill(model: &dyn Backbone, spec: &DeltaSpec, file: &TensorFile) -> Result<BTreeMap<String, Tensor>> {
    let mut by_key: BTreeMap<String, String> = BTreeMap::new(); // stripped -> original
    for k in file.names() {
        by_key.insert(strip(k).to_string(), k.to_string());
    }
    let mut used = std::collections::BTreeSet::new();
    let prefix = format!("{}.", spec.name);
    for (full, var) in attach::delta_vars(model, true) {
        let Some(rest) = full.strip_prefix(&prefix) else { continue };
        // Prompt-learning tables are stored without a module path.
        let key = match &spec.config {
            DeltaConfig::Prefix(_) | DeltaConfig::Prompt(_) => rest.rsplit('.').next().unwrap_or(rest).to_string(),
            _ => rest.to_string(),
        };
        let original = by_key.get(&key).ok_or_else(|| Error::MissingTensor { file: file.path.clone(), key: format!("base_model.model.{key}") })?;
        let t = file.get_f32(original, var.dims())?;
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
        if s.contains("lora_") || s.contains("ia3_l") || s == "prompt_embeddings" {
            return Err(Error::Delta(format!(
                "{}: adapter tensor `{k}` matches no targeted module (target_modules and the weights disagree)",
                file.path.display()
            )));
        }
        extra.insert(s, file.get(k)?.clone());
    }
    Ok(extra)
}

/// Writes the LoRA or IA3 delta group `name` of `model` as a PEFT adapter directory.
/// `base_model` goes into `base_model_name_or_path`.
pub fn export(dir: &Path, model: &dyn Backbone, spec: &DeltaSpec, base_model: &str, extra_tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let sorted = |t: &Option<TargetModules>, default: TargetModules| -> Value {
        match t.clone().unwrap_or(default) {
            TargetModules::List(mut l) => {
                l.sort();
                json!(l)
            }
            TargetModules::Regex(r) => json!(r),
        }
    };
    let opt_targets = |t: &Option<TargetModules>| -> Value {
        match t {
            None => Value::Null,
            Some(t) => sorted(&Some(t.clone()), TargetModules::List(vec![])),
        }
    };
    let defaults = spec.config.default_targets(model.model_type());
    let default_list = defaults.target_modules.unwrap_or(TargetModules::List(vec![]));
    let modules_to_save = if extra_tensors.keys().any(|k| k.starts_with("classifier.")) { json!(["classifier"]) } else { Value::Null };
    let config = match &spec.config {
        DeltaConfig::Lora(c) => {
            if c.lora_alpha.fract() != 0.0 {
                return Err(Error::Delta("PEFT stores lora_alpha as an integer in practice; export needs an integer alpha".into()));
            }
            json!({
                "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
                "base_model_name_or_path": base_model, "bias": "none", "corda_config": null, "ensure_weight_tying": false,
                "eva_config": null, "exclude_modules": opt_targets(&spec.targets.exclude_modules), "fan_in_fan_out": false,
                "inference_mode": true, "init_lora_weights": true, "kasa_config": null, "layer_replication": null,
                "layers_pattern": null, "layers_to_transform": spec.targets.layers_to_transform, "loftq_config": {},
                "lora_alpha": c.lora_alpha as i64, "lora_bias": false, "lora_dropout": c.lora_dropout as f64, "lora_ga_config": null,
                "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": modules_to_save,
                "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": c.r,
                "rank_pattern": {}, "revision": null, "target_modules": sorted(&spec.targets.target_modules, default_list),
                "target_parameters": null, "task_type": "FEATURE_EXTRACTION", "trainable_token_indices": null,
                "use_bdlora": null, "use_dora": false, "use_qalora": false, "use_rslora": c.use_rslora, "velora_config": null
            })
        }
        DeltaConfig::Ia3(c) => {
            if spec.targets.layers_to_transform.is_some() {
                return Err(Error::Delta("PEFT's IA3 has no layers_to_transform; cannot export a layer-restricted IA3".into()));
            }
            json!({
                "auto_mapping": null, "base_model_name_or_path": base_model,
                "exclude_modules": opt_targets(&spec.targets.exclude_modules), "fan_in_fan_out": false,
                "feedforward_modules": sorted(&Some(c.feedforward_for(model.model_type())), TargetModules::List(vec![])), "inference_mode": true,
                "init_ia3_weights": c.init_ia3_weights, "modules_to_save": modules_to_save, "peft_type": "IA3",
                "peft_version": "0.21.2", "revision": null, "target_modules": sorted(&spec.targets.target_modules, default_list),
                "task_type": "FEATURE_EXTRACTION"
            })
        }
        other => {
            return Err(Error::Delta(format!("export to PEFT supports lora and ia3; `{}` is {}", spec.name, other.method())));
        }
    };
    let prefix = format!("{}.", spec.name);
    let mut tensors = BTreeMap::new();
    for (full, var) in attach::delta_vars(model, true) {
        if let Some(rest) = full.strip_prefix(&prefix) {
            tensors.insert(format!("base_model.model.{rest}"), var.as_tensor().clone());
        }
    }
    for (k, t) in extra_tensors {
        tensors.insert(format!("base_model.model.{k}"), t.clone());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = tempfile::Builder::new().prefix(".peft-staging-").tempdir_in(parent).map_err(|e| Error::io(parent, e))?;
    let meta = [("format".to_string(), "pt".to_string())].into();
    save_tensors(&staging.path().join(WEIGHTS_FILE), &tensors, Some(meta))?;
    // PEFT writes its config with sorted keys and an indent of 2.
    let text = serde_json::to_string_pretty(&sort_keys(config)).map_err(|e| Error::Delta(e.to_string()))?;
    crate::io::write_atomic(&staging.path().join(CONFIG_FILE), text.as_bytes())?;
    crate::io::atomic::replace_dir(&staging.keep(), dir)
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
