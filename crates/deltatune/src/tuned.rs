//! Operations on a backbone together with its deltas: loading a saved delta whatever its format,
//! and writing a merged model as a plain HF directory.

use crate::attach::{self, AttachOptions};
use crate::backbone::bert::ModelDir;
use crate::backbone::Backbone;
use crate::delta::store::{self, Loaded};
use crate::error::{Error, Result};
use crate::io::{peft, save_tensors};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// Attaches a saved delta — deltatune's format or a PEFT adapter folder — to `model`.
pub fn load_delta(dir: &Path, model: &mut dyn Backbone, opts: AttachOptions) -> Result<Loaded> {
    if store::is_delta_dir(dir) {
        store::load(dir, model, opts)
    } else if peft::is_peft_dir(dir) {
        peft::load(dir, model, None)
    } else if !dir.exists() {
        Err(Error::NotFound { path: dir.to_path_buf(), what: "delta directory".into() })
    } else {
        Err(Error::Delta(format!(
            "{}: neither a deltatune delta ({}) nor a PEFT adapter ({})",
            dir.display(),
            store::CONFIG_FILE,
            peft::CONFIG_FILE
        )))
    }
}

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
    let n = attach::merge_all(model, true)?;
    let tensors = base_tensors(model);
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staging = tempfile::Builder::new().prefix(".merged-staging-").tempdir_in(parent).map_err(|e| Error::io(parent, e))?;
    copy_tree(&source.dir, staging.path(), &source.weights)?;
    let meta = [("format".to_string(), "pt".to_string())].into();
    save_tensors(&staging.path().join("model.safetensors"), &tensors, Some(meta))?;
    crate::io::atomic::replace_dir(&staging.keep(), out)?;
    attach::unmerge_all(model);
    Ok(n)
}

/// Copies the files of `src` into `dst` (recursively), except `skip`.
fn copy_tree(src: &Path, dst: &Path, skip: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let p = entry.path();
        if p == skip || entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let target = dst.join(entry.file_name());
        if p.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            copy_tree(&p, &target, skip)?;
        } else {
            std::fs::copy(&p, &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    Ok(())
}

/// A backbone with its deltas and a task head: what training produces and eval/predict load.
pub struct TaskModel {
    pub backbone: crate::BertModel,
    pub head: crate::head::Head,
    pub specs: Vec<crate::delta::DeltaSpec>,
}

impl TaskModel {
    /// Trainable variables: every active delta tensor, then the head.
    pub fn params(&self) -> Vec<(String, candle_core::Var)> {
        let mut p = attach::trainable_vars(&self.backbone);
        p.extend(self.head.params());
        p
    }

    /// Logits (b, outputs).
    pub fn logits(&self, batch: &crate::EncodedBatch, ctx: &crate::ForwardCtx) -> Result<Tensor> {
        let out = self.backbone.forward(batch, ctx)?;
        self.head.forward(&out)
    }

    /// Saves deltas and head (with `meta`, e.g. the task and label map) as a delta directory.
    pub fn save(&self, dir: &Path, meta: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
        let mut meta = meta.clone();
        meta.insert("head".into(), serde_json::to_value(&self.head.config).map_err(|e| Error::Delta(e.to_string()))?);
        store::save(dir, &self.backbone, &self.specs, &self.head.tensors(), &meta)
    }

    /// Loads a saved task model (deltas + head) onto `backbone`.
    pub fn load(mut backbone: crate::BertModel, dir: &Path) -> Result<(Self, serde_json::Map<String, serde_json::Value>)> {
        let loaded = load_delta(dir, &mut backbone, AttachOptions::default())?;
        let cfg_value = loaded.meta.get("head").cloned().ok_or_else(|| {
            Error::Delta(format!("{}: the delta has no task head (train one with `deltatune train`)", dir.display()))
        })?;
        let cfg: crate::head::HeadConfig =
            serde_json::from_value(cfg_value).map_err(|e| Error::Config { file: dir.join(store::CONFIG_FILE), msg: format!("head: {e}") })?;
        let head = crate::head::Head::from_tensors(cfg, &loaded.extra_tensors, &dir.join(store::WEIGHTS_FILE).display().to_string())?;
        Ok((TaskModel { backbone, head, specs: loaded.specs }, loaded.meta))
    }
}
