//! The loaded deltas as the HTTP side sees them, and where a delta may be loaded from.
//!
//! A request holds an `Arc<DeltaInfo>` while it runs: unloading removes the name at once (new
//! requests get 404) and detaches the tensors only when no request holds it any more.

use crate::error::ApiError;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How a delta's rows can share a batched pass with other deltas' rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// Only row-local hooks (LoRA, DoRA, IA3, adapters …): mixed with any other row-local delta
    /// and the bare backbone in every pass.
    Mixed,
    /// Soft prompts or prefixes: mixed in decoding steps (the virtual positions sit in each
    /// sequence's cache); prefill and encoder passes group its rows alone.
    Virtual,
    /// Replaces base parameters (BitFit, LayerNorm tuning, fine-tuning): its rows always run in
    /// passes of their own.
    Alone,
}

/// One loaded delta.
#[derive(Debug, serde::Serialize)]
pub struct DeltaInfo {
    pub name: String,
    /// Methods of its groups (`lora`, `ia3`, …).
    pub methods: Vec<String>,
    /// Trainable parameter count.
    pub params: usize,
    /// Names of its groups on the backbone's sites.
    #[serde(skip)]
    pub groups: Vec<String>,
    pub batching: Batching,
    /// Where it came from, as the operator named it (never an absolute path).
    pub source: String,
    /// Class labels of its saved head, if it has one (`/v1/classify`).
    pub labels: Option<Vec<String>>,
    /// Unix seconds when it was loaded.
    pub created: u64,
}

/// Name → loaded delta, shared by the HTTP handlers and the engine.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<BTreeMap<String, Arc<DeltaInfo>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<DeltaInfo>> {
        self.lock().get(name).cloned()
    }

    pub fn insert(&self, info: Arc<DeltaInfo>) {
        self.lock().insert(info.name.clone(), info);
    }

    pub fn remove(&self, name: &str) -> Option<Arc<DeltaInfo>> {
        self.lock().remove(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn all(&self) -> Vec<Arc<DeltaInfo>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<DeltaInfo>>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks a delta name: letters, digits, `_`, `-` and `.`, not starting with `.`, at most 64.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::field("name", "a delta name uses 1 to 64 letters, digits, `_`, `-` or `.` and does not start with `.`"))
    }
}

/// The folder a request asks to load, resolved inside `root` (`--delta-dir`). Only a relative
/// path of plain components is accepted (no `..`, no absolute path, no drive prefix), and the
/// canonical result must still lie inside the canonical root (a symlink pointing out is refused).
/// Errors name the field, never the root.
pub fn resolve_inside(root: &Path, requested: &str) -> Result<PathBuf, ApiError> {
    let rel = Path::new(requested);
    if requested.is_empty() || requested.contains('\0') {
        return Err(ApiError::field("path", "empty or invalid path"));
    }
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ApiError::field("path", "the path must be a folder name inside the server's delta directory (no `..`, no absolute path)").with_code("path_outside_delta_dir"));
    }
    let root = root.canonicalize().map_err(|_| ApiError::internal("the delta directory is not readable"))?;
    let joined = root.join(rel);
    let canon = joined.canonicalize().map_err(|_| ApiError::field("path", format!("no delta folder `{requested}` in the delta directory")).with_code("not_found"))?;
    if !canon.starts_with(&root) {
        return Err(ApiError::field("path", "the path leaves the server's delta directory").with_code("path_outside_delta_dir"));
    }
    if !canon.is_dir() {
        return Err(ApiError::field("path", format!("`{requested}` is not a folder")));
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("ok")).unwrap();
        assert!(resolve_inside(root.path(), "ok").is_ok());
        for bad in ["../ok", "/etc", "ok/../../x", "..", ""] {
            let e = resolve_inside(root.path(), bad).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
            assert!(!e.message.contains(root.path().to_str().unwrap()), "{bad}: {}", e.message);
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/", root.path().join("out")).unwrap();
            assert_eq!(resolve_inside(root.path(), "out").unwrap_err().code, Some("path_outside_delta_dir"));
        }
        assert_eq!(resolve_inside(root.path(), "missing").unwrap_err().code, Some("not_found"));
    }

    #[test]
    fn names() {
        assert!(check_name("sst2-lora_v1.2").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
