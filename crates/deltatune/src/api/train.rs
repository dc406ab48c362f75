//! The encoder training job: where the data comes from, the run directory and its guard rails,
//! model + deltas + head, the loop, and the summary. `run.json` records the resolved
//! [`TrainSpec`]; a resume must match it.

use crate::control::Control;
use crate::artifacts::TaskModel;
use crate::attach::{self, AttachOptions};
use crate::backbone::bert::BertModel;
use crate::core::Backbone;
use crate::data::sources::DataSource;
use crate::data::task::TaskOptions;
use crate::data::tokenize::TextEncoder;
use crate::delta::DeltaSpec;
use crate::error::{Error, Result};
use crate::head::{Head, HeadConfig};
use crate::io::atomic::{check_not_input, occupied, DirLock, StagedDir};
use crate::train::config::TrainConfig;
use crate::train::fit::{fit, total_steps, FitOptions};
use crate::train::task::{head_kind, prepare_split, scorer};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map};
use std::path::{Path, PathBuf};

/// The resolved description of a run (written to `run.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// The backbone directory (absolute).
    pub model: PathBuf,
    pub data: DataSource,
    pub data_options: TaskOptions,
    pub deltas: Vec<DeltaSpec>,
    pub train: TrainConfig,
}

/// Whether a run directory may hold a previous run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    Fresh,
    Resume,
    Overwrite,
}

/// The result of a run (also `summary.json`, and `--json` output).
#[derive(Clone, Debug, Serialize)]
pub struct TrainResult {
    pub task: String,
    pub method: String,
    pub metric: String,
    pub score: f64,
    pub scores: std::collections::BTreeMap<String, f64>,
    /// Delta parameters plus the head.
    pub trainable_params: usize,
    pub delta_params: usize,
    /// Backbone plus the parameters deltas and head add.
    pub total_params: usize,
    pub seconds: f64,
    pub steps: usize,
    pub best_step: Option<usize>,
    pub train_examples: usize,
    pub dev_examples: usize,
    pub stopped_early: bool,
    pub resumed_from: Option<usize>,
    /// Processes that trained together (1 alone).
    pub ranks: usize,
    /// Seconds spent exchanging gradients between ranks (0 alone).
    pub comm_seconds: f64,
    pub run_dir: PathBuf,
    pub notes: Vec<String>,
}

const RUN_FILE: &str = "run.json";

/// Checks the run directory against the mode before any work: a fresh run needs an absent or
/// empty directory, a resume needs a run started with the same settings, an overwrite leaves the
/// old run in place until the new one completes (see [`train`]).
fn check_dir(dir: &Path, spec: &TrainSpec, mode: RunMode) -> Result<()> {
    let run_file = dir.join(RUN_FILE);
    match (run_file.is_file(), occupied(dir), mode) {
        (_, false, RunMode::Resume) | (false, true, RunMode::Resume) => {
            Err(Error::arg("--resume", format!("{} holds no run to resume", dir.display())))
        }
        (true, _, RunMode::Resume) => {
            let stored: TrainSpec = serde_json::from_value(crate::io::read_json(&run_file)?)
                .map_err(|e| Error::Json { file: run_file.clone(), msg: e.to_string() })?;
            if &stored != spec {
                let a = serde_json::to_value(&stored).unwrap_or_default();
                let b = serde_json::to_value(spec).unwrap_or_default();
                let mut diff = Vec::new();
                json_diff("", &a, &b, &mut diff);
                return Err(Error::arg(
                    "--resume",
                    format!(
                        "the run in {} was started with different settings: {}; rerun the original command with --resume, or use another --out",
                        dir.display(),
                        diff.join("; ")
                    ),
                ));
            }
            Ok(())
        }
        (_, _, RunMode::Overwrite) => Ok(()),
        (true, _, RunMode::Fresh) => Err(Error::arg(
            "--out",
            format!("{} holds another run; pass --resume to continue it or --overwrite to replace it", dir.display()),
        )),
        (false, true, RunMode::Fresh) => Err(Error::arg(
            "--out",
            format!("{} is a non-empty directory that is not a deltatune run; choose another --out (or --overwrite to replace it)", dir.display()),
        )),
        (false, false, _) => Ok(()),
    }
}

/// `path: stored → given` for every leaf where two JSON values differ (at most a few).
fn json_diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    if out.len() >= 6 || a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                json_diff(&p, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                json_diff(&format!("{path}[{i}]"), u, v, out);
            }
        }
        _ => out.push(format!("{path}: {a} in the run, {b} now")),
    }
}

/// Where a run is written: in place (fresh or resumed, so that a kill leaves something
/// `--resume` continues), or — replacing an existing run — in a staging directory swapped in
/// when the new run completes, so a failure leaves the old run untouched.
enum Place {
    InPlace { _lock: DirLock },
    Staged { staging: StagedDir, _lock: DirLock },
}

/// Runs training as described by `spec` in `run_dir`. Data-parallel when `ctl` has a world of
/// several ranks (see [`crate::train::fit`]): every rank loads and checks everything, the ranks
/// agree that all of them succeeded and have the same settings and data, and rank 0 alone
/// writes the run directory.
pub fn train(spec: &TrainSpec, run_dir: &Path, mode: RunMode, ctl: &Control) -> Result<TrainResult> {
    let prepared = crate::dist::agree(ctl.world, "loading the model and data", prepare(spec, run_dir, mode, ctl))?;
    let Prepared { task, enc, train, dev, mut model } = prepared;
    crate::dist::check_same(ctl.world, "settings or data", fingerprint(spec, &train, &dev))?;
    if !ctl.writes() {
        // Reads the run directory (a resume's checkpoint) but writes nothing.
        return run_in(spec, &task, &mut model, run_dir, run_dir, mode, (&train, &dev), &enc, ctl);
    }
    train_in_place(spec, run_dir, mode, ctl, Prepared { task, enc, train, dev, model })
}

/// What every rank loads before training: the task, tokenizer, splits and the model with its
/// deltas and head.
struct Prepared {
    task: crate::data::task::TaskData,
    enc: TextEncoder,
    train: crate::train::prepared::Prepared,
    dev: crate::train::prepared::Prepared,
    model: TaskModel,
}

/// A hash of the resolved settings and the tokenized splits (ranks must agree on both).
fn fingerprint(spec: &TrainSpec, train: &crate::train::prepared::Prepared, dev: &crate::train::prepared::Prepared) -> u64 {
    let mut h = crate::ops::hash_str(&serde_json::to_string(spec).unwrap_or_default());
    for split in [train, dev] {
        for (e, t) in split.encodings.iter().zip(&split.targets) {
            for &id in e.input_ids.iter().chain(std::iter::once(&t.to_bits())) {
                h = (h ^ u64::from(id)).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
    }
    h
}

fn prepare(spec: &TrainSpec, run_dir: &Path, mode: RunMode, ctl: &Control) -> Result<Prepared> {
    spec.train.validate()?;
    spec.data_options.validate()?;
    if spec.deltas.is_empty() {
        return Err(Error::arg("--delta", "give at least one delta (e.g. --delta lora), or --delta full for full fine-tuning"));
    }
    let inputs: Vec<(&str, &Path)> = std::iter::once(("--model", spec.model.as_path())).chain(spec.data.paths().into_iter().map(|p| ("--data", p))).collect();
    check_not_input(run_dir, "--out", &inputs)?;
    check_dir(run_dir, spec, mode)?;
    let task = spec.data.load(&spec.data_options, &mut ctl.messages())?;
    for n in &task.notes {
        ctl.message(format!("note: {n}"));
    }
    let backbone = BertModel::load(&spec.model, &Device::Cpu)?;
    let enc = TextEncoder::from_file(&backbone.files.tokenizer, spec.train.max_length)?;
    let train = prepare_split(&task.train, &enc)?;
    let dev = prepare_split(&task.dev, &enc)?;
    // Settings that follow the run's length (AdaLoRA's total_step) are filled in here, so that
    // the saved deltas carry them (run.json keeps the specs as given: a resume derives the same).
    let mut specs = spec.deltas.clone();
    let total = total_steps(&spec.train, train.len());
    for d in &mut specs {
        d.config.set_run_length(total).map_err(|e| Error::arg("--delta", format!("`{}`: {e}", d.name)))?;
    }
    let specs = &specs;
    let mut backbone = backbone;
    attach::attach(&mut backbone, specs, AttachOptions { seed: spec.train.seed, tokenizer: Some(&enc) })?;
    let head_cfg = HeadConfig { kind: head_kind(task.kind), pooling: spec.train.pooling, hidden_size: backbone.hidden_size() };
    let head = Head::new(head_cfg, spec.train.seed, backbone.device())?;
    let model = TaskModel { backbone, head, specs: specs.to_vec() };
    let tree = model.backbone.tree();
    if tree.trainable_params == 0 {
        return Err(Error::arg("--delta", "the deltas have no trainable parameters (are they all disabled or merged?)"));
    }
    Ok(Prepared { task, enc, train, dev, model })
}

/// The writing rank's part: the run directory (in place or staged), the loop, the summary.
fn train_in_place(spec: &TrainSpec, run_dir: &Path, mode: RunMode, ctl: &Control, p: Prepared) -> Result<TrainResult> {
    let Prepared { task, enc, train, dev, mut model } = p;
    // Everything that can fail on bad input has been checked; now the run directory.
    let place = if mode == RunMode::Overwrite && occupied(run_dir) {
        let lock = DirLock::acquire(run_dir, "--out")?;
        Place::Staged { staging: StagedDir::new(run_dir)?, _lock: lock }
    } else {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io_op(run_dir, "creating", e))?;
        Place::InPlace { _lock: DirLock::acquire(run_dir, "--out")? }
    };
    let work_dir = match &place {
        Place::InPlace { .. } => run_dir,
        Place::Staged { staging, .. } => staging.path(),
    };
    let created = mode != RunMode::Resume;
    let summary = match run_in(spec, &task, &mut model, work_dir, run_dir, mode, (&train, &dev), &enc, ctl) {
        Ok(s) => s,
        Err(e) => {
            // A fresh run that failed before its first checkpoint leaves nothing to resume:
            // remove what it wrote rather than leave a directory that blocks the next attempt.
            if created && matches!(place, Place::InPlace { .. }) && !crate::train::checkpoint::last_dir(run_dir).join("state.json").is_file() {
                let _ = std::fs::remove_dir_all(run_dir); // best effort; the error is what matters
            }
            return Err(e);
        }
    };
    if let Place::Staged { staging, .. } = place {
        staging.commit(true)?;
    }
    Ok(summary)
}

/// The run itself, in `work_dir` (the run directory, or a staging directory replacing `run_dir`).
#[allow(clippy::too_many_arguments)]
fn run_in(
    spec: &TrainSpec,
    task: &crate::data::task::TaskData,
    model: &mut TaskModel,
    work_dir: &Path,
    run_dir: &Path,
    mode: RunMode,
    (train, dev): (&crate::train::prepared::Prepared, &crate::train::prepared::Prepared),
    enc: &TextEncoder,
    ctl: &Control,
) -> Result<TrainResult> {
    let specs = &spec.deltas;
    if mode != RunMode::Resume && ctl.writes() {
        crate::io::write_json_atomic(&work_dir.join(RUN_FILE), spec)?;
    }
    let tree = model.backbone.tree();
    let delta_params = tree.trainable_params;
    let head_params = model.head.params().iter().map(|(_, v)| v.elem_count()).sum::<usize>();
    let method = specs.iter().map(|s| s.config.method()).collect::<Vec<_>>().join("+");
    ctl.message(format!(
        "{} ({} train / {} dev): {method}, {} trainable parameters ({:.4}% of {}) + {} head",
        task.name,
        train.len(),
        dev.len(),
        delta_params,
        tree.trainable_percent,
        tree.all_params,
        head_params
    ));
    let mut meta = Map::new();
    meta.insert(
        "task".into(),
        json!({"name": task.name, "kind": task.kind, "metrics": task.metrics, "labels": task.labels, "max_length": spec.train.max_length}),
    );
    meta.insert("data".into(), serde_json::to_value(&spec.data).unwrap_or_default());
    meta.insert("data_options".into(), serde_json::to_value(&spec.data_options).unwrap_or_default());
    let sc = scorer(task);
    let result = fit(
        model,
        FitOptions {
            cfg: &spec.train,
            train,
            dev: Some(dev),
            scorer: &sc,
            run_dir: work_dir,
            final_dir: run_dir,
            resume: mode == RunMode::Resume,
            ctl,
            meta,
            pad_id: enc.pad_id(),
        },
    )?;
    let scores = result.best_scores.clone().map(|s| s.values).unwrap_or_default();
    let metric = task.metrics.first().map(|m| m.name().to_string()).unwrap_or_default();
    let summary = TrainResult {
        task: task.name.clone(),
        method,
        score: result.best_score.unwrap_or(f64::NAN),
        metric,
        scores,
        trainable_params: delta_params + head_params,
        delta_params,
        total_params: tree.all_params + head_params,
        seconds: result.seconds,
        steps: result.steps,
        best_step: result.best_step,
        train_examples: train.len(),
        dev_examples: dev.len(),
        stopped_early: result.stopped_early,
        resumed_from: result.resumed_from,
        ranks: result.ranks,
        comm_seconds: (result.comm_seconds * 1000.0).round() / 1000.0,
        run_dir: run_dir.to_path_buf(),
        notes: task.notes.iter().chain(&result.reports).cloned().collect(),
    };
    if ctl.writes() {
        crate::io::write_json_atomic(&work_dir.join("summary.json"), &summary)?;
    }
    Ok(summary)
}
