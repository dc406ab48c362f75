//! A [`DeltaSpec`]: one named delta group — method, hyperparameters and where it attaches — as
//! written on the command line (`lora:r=8,lora_alpha=16,target=query+value,layers=0-2`) or in a
//! JSON config (one flat object per delta, PEFT's field names).
//!
//! Unknown keys in a JSON file are warned about and kept for rewrite (files from newer versions
//! still load); an unknown key typed on the command line is an error suggesting the nearest key.

use super::registry::DeltaConfig;
use super::targets::{TargetModules, Targets};
use crate::error::{suggest, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One named delta group.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaSpec {
    /// Unique within a model; names the group in files, trees and on/off switches.
    pub name: String,
    pub config: DeltaConfig,
    pub targets: Targets,
    /// Keys this version does not know, kept so that rewriting a file loses nothing.
    pub extra: BTreeMap<String, Value>,
}

const COMMON_KEYS: &[&str] = &["name", "method", "target_modules", "layers_to_transform", "exclude_modules"];

/// Short forms accepted on the command line: the common ones, then the method's own.
fn alias(config: &DeltaConfig, key: &str) -> String {
    let k = match key {
        "target" | "targets" => "target_modules",
        "layers" => "layers_to_transform",
        "exclude" => "exclude_modules",
        _ => config.key_aliases().iter().find(|(short, _)| *short == key).map(|(_, long)| *long).unwrap_or(key),
    };
    k.to_string()
}

impl DeltaSpec {
    /// A spec with the method's defaults.
    pub fn new(name: impl Into<String>, config: DeltaConfig) -> Self {
        DeltaSpec { name: name.into(), config, targets: Targets::default(), extra: BTreeMap::new() }
    }

    pub fn with_targets(mut self, targets: &[&str]) -> Self {
        self.targets.target_modules = Some(TargetModules::List(targets.iter().map(|s| s.to_string()).collect()));
        self
    }

    pub fn with_layers(mut self, layers: &[usize]) -> Self {
        self.targets.layers_to_transform = Some(layers.to_vec());
        self
    }

    /// The flat JSON object of this spec.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("name".into(), Value::String(self.name.clone()));
        if let Ok(Value::Object(cfg)) = serde_json::to_value(&self.config) {
            obj.extend(cfg);
        }
        if let Ok(Value::Object(t)) = serde_json::to_value(&self.targets) {
            obj.extend(t);
        }
        for (k, v) in &self.extra {
            obj.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(obj)
    }

    /// Parses a flat JSON object. Unknown keys are returned as warnings and kept in `extra`.
    pub fn from_json(v: &Value, origin: &str) -> Result<(Self, Vec<String>)> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::Delta(format!("{origin}: a delta must be a JSON object, got {v}")))?;
        let method = obj
            .get("method")
            .and_then(|m| m.as_str())
            .ok_or_else(|| Error::Delta(format!("{origin}: missing string field `method`")))?;
        let (spec, unknown) = Self::from_object(method, obj, origin)?;
        let warnings = unknown
            .iter()
            .map(|k| format!("{origin}: unknown key `{k}` for {} ignored (kept on rewrite)", spec.config.method()))
            .collect();
        Ok((spec, warnings))
    }

    fn from_object(method: &str, obj: &Map<String, Value>, origin: &str) -> Result<(Self, Vec<String>)> {
        let default = DeltaConfig::default_for(method)?;
        // A switch (`lora` with `use_dora=true`) selects another method; false is the method itself.
        for (key, other) in default.switches() {
            match obj.get(*key) {
                None => {}
                Some(Value::Bool(on)) => {
                    let mut rest = obj.clone();
                    rest.remove(*key);
                    let target = if *on { *other } else { method };
                    if *on {
                        rest.insert("method".into(), Value::String(target.into()));
                    }
                    return Self::from_object(target, &rest, origin);
                }
                Some(v) => return Err(Error::Delta(format!("{origin}: `{key}` must be true or false, got {v}"))),
            }
        }
        let canonical = default.method();
        let known: Vec<String> = match serde_json::to_value(&default) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let mut cfg_obj = Map::new();
        let mut extra = BTreeMap::new();
        let mut unknown = Vec::new();
        for (k, v) in obj {
            if COMMON_KEYS.contains(&k.as_str()) {
                continue;
            }
            if known.iter().any(|x| x == k) {
                cfg_obj.insert(k.clone(), v.clone());
            } else {
                extra.insert(k.clone(), v.clone());
                unknown.push(k.clone());
            }
        }
        // Aliases that select a variant of the method (e.g. `houlsby`) carry their own defaults.
        let mut base = match serde_json::to_value(&default) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        base.extend(cfg_obj);
        base.insert("method".into(), Value::String(canonical.into()));
        let config: DeltaConfig = serde_json::from_value(Value::Object(base))
            .map_err(|e| Error::Delta(format!("{origin}: invalid {canonical} config: {e}")))?;
        let targets = Targets {
            target_modules: parse_targets(obj.get("target_modules"), origin, "target_modules")?,
            layers_to_transform: match obj.get("layers_to_transform") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| bad_layers(origin, &n.to_string()))? as usize]),
                Some(Value::String(s)) => Some(parse_layers(s).map_err(|_| bad_layers(origin, s))?),
                Some(Value::Array(a)) => Some(
                    a.iter()
                        .map(|x| x.as_u64().map(|u| u as usize).ok_or_else(|| bad_layers(origin, &x.to_string())))
                        .collect::<Result<Vec<_>>>()?,
                ),
                Some(other) => return Err(bad_layers(origin, &other.to_string())),
            },
            exclude_modules: parse_targets(obj.get("exclude_modules"), origin, "exclude_modules")?,
        };
        let name = match obj.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => canonical.to_string(),
            Some(other) => return Err(Error::Delta(format!("{origin}: `name` must be a string, got {other}"))),
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(Error::Delta(format!("{origin}: delta name `{name}` may only use letters, digits, `_` and `-`")));
        }
        Ok((DeltaSpec { name, config, targets, extra }, unknown))
    }

    /// Parses `method[:key=value,...]` from the command line. Unknown keys are errors.
    pub fn parse_cli(s: &str) -> Result<Self> {
        let origin = format!("--delta {s}");
        let (method, rest) = s.split_once(':').unwrap_or((s, ""));
        let method = method.trim();
        let default = DeltaConfig::default_for(method).map_err(|e| Error::arg("--delta", e.to_string()))?;
        let canonical = default.method();
        // Split on commas; a piece without `=` continues the previous value (`layers=0-2,5`).
        let mut pairs: Vec<(String, String)> = Vec::new();
        for piece in rest.split(',').filter(|p| !p.trim().is_empty()) {
            match piece.split_once('=') {
                Some((k, v)) => pairs.push((k.trim().to_string(), v.trim().to_string())),
                None => match pairs.last_mut() {
                    Some((_, v)) => {
                        v.push(',');
                        v.push_str(piece.trim());
                    }
                    None => {
                        return Err(Error::arg("--delta", format!("`{piece}` in `{s}` is not key=value")));
                    }
                },
            }
        }
        let mut obj = Map::new();
        obj.insert("method".into(), Value::String(method.to_string()));
        for (k, v) in pairs {
            let key = alias(&default, &k);
            let value = match key.as_str() {
                "target_modules" | "exclude_modules" | "feedforward_modules" => {
                    Value::Array(v.split(['+', ',']).filter(|x| !x.is_empty()).map(|x| Value::String(x.to_string())).collect())
                }
                "layers_to_transform" | "name" => Value::String(v),
                _ => infer_value(&v),
            };
            if obj.insert(key.clone(), value).is_some() {
                return Err(Error::arg("--delta", format!("key `{key}` given twice in `{s}`")));
            }
        }
        let (spec, unknown) = Self::from_object(method, &obj, &origin).map_err(|e| Error::arg("--delta", e.to_string()))?;
        if let Some(k) = unknown.first() {
            let known = spec.known_keys();
            return Err(Error::arg(
                "--delta",
                format!(
                    "unknown key `{k}` for {canonical}{}; known keys: {}",
                    suggest(k, known.iter().map(|s| s.as_str())),
                    known.join(", ")
                ),
            ));
        }
        Ok(spec)
    }

    /// Keys accepted for this spec's method (config fields and the common keys).
    pub fn known_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = COMMON_KEYS.iter().filter(|k| **k != "method").map(|s| s.to_string()).collect();
        if let Ok(Value::Object(m)) = serde_json::to_value(&self.config) {
            keys.extend(m.keys().filter(|k| *k != "method").cloned());
        }
        keys
    }
}

/// A spec serializes as its flat JSON object ([`DeltaSpec::to_json`]), PEFT's field names.
impl Serialize for DeltaSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// Reads the flat JSON object; unknown keys are kept in `extra` (not warned about here).
impl<'de> Deserialize<'de> for DeltaSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        DeltaSpec::from_json(&v, "delta").map(|(s, _)| s).map_err(serde::de::Error::custom)
    }
}

/// Parses a list of specs from a JSON document: a single object, a list, or `{"deltas": [...]}`.
pub fn parse_config_file(text: &str, origin: &str) -> Result<(Vec<DeltaSpec>, Vec<String>)> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| Error::Json { file: origin.into(), msg: e.to_string() })?;
    let items: Vec<Value> = match v {
        Value::Array(a) => a,
        Value::Object(ref o) if o.contains_key("deltas") => match o.get("deltas") {
            Some(Value::Array(a)) => a.clone(),
            _ => return Err(Error::Delta(format!("{origin}: `deltas` must be a list"))),
        },
        Value::Object(_) => vec![v],
        other => return Err(Error::Delta(format!("{origin}: expected a delta object or a list, got {other}"))),
    };
    let mut specs = Vec::new();
    let mut warnings = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let (s, w) = DeltaSpec::from_json(item, &format!("{origin} (delta {i})"))?;
        specs.push(s);
        warnings.extend(w);
    }
    Ok((specs, warnings))
}

fn bad_layers(origin: &str, v: &str) -> Error {
    Error::Delta(format!("{origin}: layers `{v}` is not a layer list such as `0-2,5`"))
}

fn parse_targets(v: Option<&Value>, origin: &str, key: &str) -> Result<Option<TargetModules>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(TargetModules::Regex(s.clone()))),
        Some(Value::Array(a)) if a.is_empty() && key != "exclude_modules" => {
            Err(Error::Delta(format!("{origin}: `{key}` is empty; name at least one module (or leave it out for the method's defaults)")))
        }
        Some(Value::Array(a)) => Ok(Some(TargetModules::List(
            a.iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::Delta(format!("{origin}: `{key}` entries must be strings, got {x}")))
                })
                .collect::<Result<Vec<_>>>()?,
        ))),
        Some(other) => Err(Error::Delta(format!("{origin}: `{key}` must be a string or a list, got {other}"))),
    }
}

/// `0-2,5` → [0, 1, 2, 5] (also accepts `+` as separator).
pub fn parse_layers(s: &str) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split([',', '+']).map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| part.to_string())?, b.trim().parse().map_err(|_| part.to_string())?);
                if a > b {
                    return Err(part.to_string());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| part.to_string())?),
        }
    }
    if out.is_empty() {
        return Err(s.to_string());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn infer_value(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = v.parse::<f64>() {
        if f.is_finite() {
            return Value::from(f);
        }
    }
    match v {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" | "none" => Value::Null,
        _ => Value::String(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_spec_parses_with_aliases_and_layers() {
        let s = DeltaSpec::parse_cli("lora:r=4,alpha=16,target=query+value,layers=0-2,5,name=lq").unwrap();
        assert_eq!(s.name, "lq");
        match &s.config {
            DeltaConfig::Lora(c) => {
                assert_eq!(c.r, 4);
                assert_eq!(c.lora_alpha, 16.0);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.targets.target_modules, Some(TargetModules::List(vec!["query".into(), "value".into()])));
        assert_eq!(s.targets.layers_to_transform, Some(vec![0, 1, 2, 5]));
    }

    #[test]
    fn cli_typo_suggests_nearest_key() {
        let err = DeltaSpec::parse_cli("lora:r=8,lora_alpah=16").unwrap_err().to_string();
        assert!(err.contains("unknown key `lora_alpah` for lora (did you mean `lora_alpha`?)"), "{err}");
        let err = DeltaSpec::parse_cli("lorra:r=8").unwrap_err().to_string();
        assert!(err.contains("unknown delta method `lorra` (did you mean `lora`?)"), "{err}");
        let err = DeltaSpec::parse_cli("lora:r=eight").unwrap_err().to_string();
        assert!(err.contains("invalid lora config"), "{err}");
    }

    #[test]
    fn json_unknown_keys_warn_and_round_trip() {
        let v: Value = serde_json::json!({"method": "lora", "r": 8, "target_modules": ["query"], "future_knob": 3});
        let (s, warnings) = DeltaSpec::from_json(&v, "cfg.json").unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("unknown key `future_knob`"), "{warnings:?}");
        let back = s.to_json();
        assert_eq!(back["future_knob"], 3);
        let (s2, _) = DeltaSpec::from_json(&back, "cfg.json").unwrap();
        assert_eq!(s, s2);
    }

    #[test]
    fn layers_syntax() {
        assert_eq!(parse_layers("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_layers("3").unwrap(), vec![3]);
        assert!(parse_layers("2-1").is_err());
        assert!(parse_layers("x").is_err());
    }
}
