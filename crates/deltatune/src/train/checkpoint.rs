//! Checkpoints of a training run. `checkpoints/last/` holds everything needed to continue exactly
//! where the run stopped: the deltas and head (a regular delta directory, `delta/`), the AdamW
//! moments (`optimizer.safetensors`) and the loop position (`state.json`: optimizer step, epoch,
//! next micro-batch, early-stopping counters). Every other source of randomness is a pure function
//! of (seed, step), so these are all the state there is. A checkpoint is written into a staging
//! directory and renamed over the previous one: a kill at any moment leaves a complete checkpoint.

use crate::error::{Error, Result};
use crate::io::atomic::StagedDir;
use crate::io::{save_tensors, TensorFile};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the loop stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps done.
    pub step: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Next micro-batch of the epoch's batch order.
    pub next_batch: usize,
    /// Best dev score so far and the step it was reached at.
    pub best_score: Option<f64>,
    pub best_step: Option<usize>,
    /// Evaluations since the best one (early stopping).
    pub evals_since_best: usize,
    /// Training seconds before this checkpoint (for the final summary).
    pub elapsed_s: f64,
    /// The run's seed, checked on resume.
    pub seed: u64,
    /// Examples seen.
    pub examples: usize,
}

pub fn last_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints").join("last")
}

/// Writes a checkpoint: `save_delta` fills the given directory with the delta (and head).
pub fn save(
    run_dir: &Path,
    state: &LoopState,
    optimizer: &BTreeMap<String, Tensor>,
    save_delta: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let staging = StagedDir::new(&last_dir(run_dir))?;
    save_delta(&staging.path().join("delta"))?;
    save_tensors(&staging.path().join("optimizer.safetensors"), optimizer, None)?;
    crate::io::write_json_atomic(&staging.path().join("state.json"), state)?;
    staging.commit(true)
}

/// Reads the loop state and optimizer moments of the last checkpoint, if there is one.
pub fn load(run_dir: &Path, device: &Device) -> Result<Option<(LoopState, BTreeMap<String, Tensor>, PathBuf)>> {
    let dir = last_dir(run_dir);
    let state_path = dir.join("state.json");
    if !state_path.is_file() {
        return Ok(None);
    }
    let v = crate::io::read_json(&state_path)?;
    let state: LoopState = serde_json::from_value(v).map_err(|e| Error::Json { file: state_path.clone(), msg: e.to_string() })?;
    let file = TensorFile::load(&dir.join("optimizer.safetensors"), device)?;
    file.check_finite()?;
    let opt = file.into_map();
    Ok(Some((state, opt, dir.join("delta"))))
}
