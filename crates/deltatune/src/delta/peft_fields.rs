//! Reading and writing the fields of PEFT's `adapter_config.json`, for the methods' own
//! [`super::method::Method::from_peft`] / [`super::method::Method::to_peft`]. Knows PEFT's JSON
//! conventions (lists or regex strings for module names, integer layer lists); the file itself
//! is read and written by the artifacts layer.

use super::targets::{TargetModules, Targets};
use crate::core::BackboneInfo;
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// PEFT's version whose config fields our export reproduces.
pub const PEFT_VERSION: &str = "0.21.2";

/// An `adapter_config.json` being read.
pub struct PeftIn<'a> {
    pub obj: &'a Map<String, Value>,
    pub path: &'a Path,
    pub info: BackboneInfo,
    pub model_type: &'a str,
}

impl PeftIn<'_> {
    /// A config error naming the file.
    pub fn bad(&self, msg: impl Into<String>) -> Error {
        Error::Config { file: self.path.to_path_buf(), msg: msg.into() }
    }

    /// A required number.
    pub fn num(&self, key: &str) -> Result<f64> {
        self.obj.get(key).and_then(Value::as_f64).ok_or_else(|| Error::MissingField { file: self.path.to_path_buf(), field: key.into() })
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.obj.get(key).ok_or_else(|| Error::MissingField { file: self.path.to_path_buf(), field: key.into() })?;
        v.as_u64().map(|u| u as usize).ok_or_else(|| self.bad(format!("`{key}` must be a non-negative integer, got {v}")))
    }

    /// An optional number with a default.
    pub fn num_or(&self, key: &str, default: f64) -> f64 {
        self.obj.get(key).and_then(Value::as_f64).unwrap_or(default)
    }

    /// An optional integer with a default.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    /// An optional boolean with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.obj.get(key).and_then(Value::as_bool).unwrap_or(default)
    }

    /// An optional string.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.obj.get(key).and_then(Value::as_str)
    }

    /// Refuses a feature we do not implement when the config turns it on.
    pub fn refuse_true(&self, key: &str, what: &str) -> Result<()> {
        if self.obj.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(self.bad(format!("{what} (`{key}`) is not supported")));
        }
        Ok(())
    }

    /// Refuses a per-module override map (`rank_pattern`, `alpha_pattern`) that is not empty.
    pub fn refuse_pattern(&self, key: &str) -> Result<()> {
        if self.obj.get(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(self.bad(format!("`{key}` (per-module settings) is not supported")));
        }
        Ok(())
    }

    /// A module list (sorted) or regex string.
    pub fn modules(&self, key: &str) -> Result<Option<TargetModules>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(TargetModules::Regex(s.clone()))),
            Some(Value::Array(a)) => {
                let mut l = Vec::with_capacity(a.len());
                for x in a {
                    l.push(x.as_str().map(str::to_string).ok_or_else(|| self.bad(format!("`{key}` entries must be strings, got {x}")))?);
                }
                l.sort();
                Ok(Some(TargetModules::List(l)))
            }
            Some(other) => Err(self.bad(format!("`{key}` must be a string or a list, got {other}"))),
        }
    }

    /// `target_modules`, `layers_to_transform` and `exclude_modules`.
    pub fn targets(&self) -> Result<Targets> {
        let layers = match self.obj.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| self.bad(format!("bad layers_to_transform {n}")))? as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|u| u as usize).ok_or_else(|| self.bad(format!("bad layers_to_transform entry {x}"))))
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(other) => return Err(self.bad(format!("bad layers_to_transform {other}"))),
        };
        Ok(Targets { target_modules: self.modules("target_modules")?, layers_to_transform: layers, exclude_modules: self.modules("exclude_modules")? })
    }

    /// Checks PEFT's prompt-learning dimensions (`token_dim`, `num_layers`) against the model.
    pub fn check_dims(&self, token_dim: usize) -> Result<()> {
        for (k, want) in [("token_dim", token_dim), ("num_layers", self.info.num_layers)] {
            if let Some(got) = self.obj.get(k).and_then(Value::as_u64) {
                if got as usize != want {
                    return Err(self.bad(format!("{k} is {got} but the model has {want}")));
                }
            }
        }
        Ok(())
    }
}

/// What an export knows besides the delta itself.
pub struct PeftOut<'a> {
    /// `base_model_name_or_path`.
    pub base_model: &'a str,
    pub model_type: &'a str,
    /// `["classifier"]` when a task head is saved with the adapter, else null.
    pub modules_to_save: Value,
}

impl PeftOut<'_> {
    /// A module list as PEFT writes it (sorted), or a regex string.
    pub fn modules(t: &TargetModules) -> Value {
        match t {
            TargetModules::List(l) => {
                let mut l = l.clone();
                l.sort();
                json!(l)
            }
            TargetModules::Regex(r) => json!(r),
        }
    }

    /// `target_modules` (resolved to the method's default when unset) and `exclude_modules`.
    pub fn target_fields(&self, targets: &Targets, default: &Targets) -> (Value, Value) {
        let t = targets.target_modules.as_ref().or(default.target_modules.as_ref()).map(Self::modules).unwrap_or_else(|| json!([]));
        let e = targets.exclude_modules.as_ref().map(Self::modules).unwrap_or(Value::Null);
        (t, e)
    }
}
