//! A backbone with its deltas and a task head: what training produces and eval/predict load.

use super::delta_dir;
use super::load::load_delta;
use crate::attach::{self, AttachOptions};
use crate::backbone::bert::BertModel;
use crate::core::{Backbone, ForwardCtx};
use crate::data::tokenize::EncodedBatch;
use crate::delta::DeltaSpec;
use crate::error::{Error, Result};
use crate::head::{Head, HeadConfig};
use candle_core::{Tensor, Var};
use std::path::Path;

/// A backbone with its deltas and a task head: what training produces and eval/predict load.
pub struct TaskModel {
    pub backbone: BertModel,
    pub head: Head,
    pub specs: Vec<DeltaSpec>,
}

impl TaskModel {
    /// Trainable variables: every active delta tensor, then the head.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut p = attach::trainable_vars(&self.backbone);
        p.extend(self.head.params());
        p
    }

    /// Logits (b, outputs).
    pub fn logits(&self, batch: &EncodedBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        let out = self.backbone.forward(batch, ctx)?;
        self.head.forward(&out)
    }

    /// Saves deltas and head (with `meta`, e.g. the task and label map) as a delta directory.
    pub fn save(&self, dir: &Path, meta: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
        let mut meta = meta.clone();
        meta.insert("head".into(), serde_json::to_value(&self.head.config).map_err(|e| Error::Delta(e.to_string()))?);
        delta_dir::save(dir, &self.backbone, &self.specs, &self.head.tensors(), &meta)
    }

    /// Loads a saved task model (deltas + head) onto `backbone`.
    pub fn load(mut backbone: BertModel, dir: &Path) -> Result<(Self, serde_json::Map<String, serde_json::Value>)> {
        let loaded = load_delta(dir, &mut backbone, AttachOptions::default())?;
        let cfg_value = loaded.meta.get("head").cloned().ok_or_else(|| {
            Error::Delta(format!("{}: the delta has no task head (train one with `deltatune train`)", dir.display()))
        })?;
        let cfg: HeadConfig =
            serde_json::from_value(cfg_value).map_err(|e| Error::Config { file: dir.join(delta_dir::CONFIG_FILE), msg: format!("head: {e}") })?;
        let head = Head::from_tensors(cfg, &loaded.extra_tensors, &dir.join(delta_dir::WEIGHTS_FILE).display().to_string())?;
        Ok((TaskModel { backbone, head, specs: loaded.specs }, loaded.meta))
    }
}
