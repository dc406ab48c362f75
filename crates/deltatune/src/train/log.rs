//! Run records: one JSON object per line in `metrics.jsonl` (training steps and evaluations).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// One record of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Train {
        step: usize,
        epoch: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        examples_per_s: f64,
        elapsed_s: f64,
        /// Data-parallel runs: seconds this step spent exchanging gradients (rank 0's view).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comm_s: Option<f64>,
    },
    Eval { step: usize, epoch: usize, metric: String, score: f64, scores: serde_json::Map<String, serde_json::Value>, loss: f64 },
    /// The end of an epoch: its training seconds (evaluation excluded; the first epoch includes
    /// building a frozen-prefix cache).
    Epoch { step: usize, epoch: usize, train_seconds: f64 },
    /// A structure-search step: weight loss, learning rates, expected parameters under p.
    Search { step: usize, loss: f64, lr: f64, alpha_lr: f64, expected_params: f64, top: Vec<String>, elapsed_s: f64 },
}

impl Record {
    pub fn step(&self) -> usize {
        match self {
            Record::Train { step, .. } | Record::Eval { step, .. } | Record::Search { step, .. } | Record::Epoch { step, .. } => *step,
        }
    }
}

/// Appends records to a run's `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens (creating) the log. With `keep_until = Some(step)`, records after `step` — written
    /// by an interrupted run after its last checkpoint — are dropped first (atomically).
    pub fn open(path: &Path, keep_until: Option<usize>) -> Result<Self> {
        if let Some(step) = keep_until {
            let kept: Vec<Record> = read_records(path)?.into_iter().filter(|r| r.step() <= step).collect();
            let mut text = String::new();
            for r in &kept {
                text.push_str(&serde_json::to_string(r).map_err(|e| Error::Json { file: path.into(), msg: e.to_string() })?);
                text.push('\n');
            }
            crate::io::write_atomic(path, text.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, r: &Record) -> Result<()> {
        let mut line = serde_json::to_string(r).map_err(|e| Error::Json { file: self.path.clone(), msg: e.to_string() })?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

/// Reads every record of a `metrics.jsonl` (a missing file is empty; a torn last line from a
/// killed process is ignored; any other bad line is an error naming it).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let lines: Vec<String> = std::io::BufReader::new(f).lines().collect::<std::io::Result<_>>().map_err(|e| Error::io(path, e))?;
    let n = lines.len();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == n => {} // torn final line
            Err(e) => return Err(Error::Text { file: path.into(), line: i + 1, msg: format!("bad metrics record: {e}") }),
        }
    }
    Ok(out)
}
