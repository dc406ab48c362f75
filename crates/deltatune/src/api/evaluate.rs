//! The evaluation and prediction jobs: a trained task model (deltas + head) scored on a split of
//! its task (or other data), or run on new texts.

use super::common::{encoder_dir, trained_delta_dir};
use crate::artifacts::TaskModel;
use crate::backbone::bert::BertModel;
use crate::control::Control;
use crate::data::sources::DataSource;
use crate::data::task::{LabelMap, TaskData, TaskOptions};
use crate::data::tokenize::TextEncoder;
use crate::error::{Error, Result};
use crate::head::HeadKind;
use crate::train::eval::{evaluate as eval_split, predict as predict_split};
use crate::train::prepared::Prepared;
use crate::train::task::{prepare_split, scorer};
use candle_core::Device;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which split of a task to score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Dev,
    Test,
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "dev" => Ok(Split::Dev),
            "test" => Ok(Split::Test),
            other => Err(Error::arg("--split", format!("`{other}` (dev, test, train)"))),
        }
    }
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

/// `deltatune eval`.
#[derive(Clone, Debug)]
pub struct EvalSpec {
    /// The backbone (`None`: the default model).
    pub model: Option<PathBuf>,
    /// A trained delta directory (or a run directory: its `best/`).
    pub delta: PathBuf,
    /// Other data than the delta's own task (`None`: the data it was trained on).
    pub data: Option<(DataSource, TaskOptions)>,
    pub split: Split,
    pub batch_size: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    pub task: String,
    pub split: Split,
    pub examples: usize,
    pub metric: String,
    pub score: f64,
    pub scores: BTreeMap<String, f64>,
    pub loss: f64,
}

/// Loads a trained task model and the metadata saved with it.
pub fn load_task_model(model: Option<&Path>, delta: &Path, ctl: &Control) -> Result<(TaskModel, Map<String, Value>)> {
    let dir = trained_delta_dir(delta);
    let backbone = BertModel::load(&encoder_dir(model, ctl)?, &Device::Cpu)?;
    TaskModel::load(backbone, &dir)
}

/// The maximum sequence length a task model was trained with.
fn max_length(meta: &Map<String, Value>) -> usize {
    meta.get("task").and_then(|t| t["max_length"].as_u64()).unwrap_or(128) as usize
}

pub fn evaluate(spec: &EvalSpec, ctl: &Control) -> Result<EvalResult> {
    if spec.batch_size == 0 {
        return Err(Error::arg("--batch-size", "must be at least 1"));
    }
    let (model, meta) = load_task_model(spec.model.as_deref(), &spec.delta, ctl)?;
    let (source, opts) = match &spec.data {
        Some((s, o)) => (s.clone(), o.clone()),
        None => {
            let s: DataSource = serde_json::from_value(meta.get("data").cloned().ok_or_else(|| {
                Error::arg("--task", "the delta records no data source; pass --task or --data")
            })?)
            .map_err(|e| Error::Delta(format!("{}: recorded data source: {e}", spec.delta.display())))?;
            let o: TaskOptions = serde_json::from_value(meta.get("data_options").cloned().unwrap_or_default()).unwrap_or_default();
            (s, o)
        }
    };
    let task = source.load(&opts, &mut ctl.messages())?;
    check_labels(&model, &meta, &task, &spec.delta)?;
    let examples = match spec.split {
        Split::Dev => &task.dev,
        Split::Train => &task.train,
        Split::Test => task.test.as_ref().ok_or_else(|| Error::arg("--split", "this task has no labelled test split"))?,
    };
    let enc = TextEncoder::from_file(&model.backbone.files.tokenizer, max_length(&meta))?;
    let data = prepare_split(examples, &enc)?;
    let sc = scorer(&task);
    let ev = eval_split(&model, &data, spec.batch_size, enc.pad_id(), &sc)?;
    let scores = ev.scores.ok_or_else(|| Error::Delta("evaluation produced no scores".into()))?;
    Ok(EvalResult {
        task: task.name.clone(),
        split: spec.split,
        examples: data.len(),
        metric: scores.primary.clone(),
        score: scores.primary_value(),
        scores: scores.values.clone(),
        loss: ev.loss,
    })
}

/// Refuses data whose task type or label set differs from what the delta's head was trained on:
/// scores computed through a head for other labels would be meaningless.
fn check_labels(model: &TaskModel, meta: &Map<String, Value>, task: &TaskData, delta: &Path) -> Result<()> {
    let trained_on = meta.get("task").and_then(|t| t["name"].as_str()).unwrap_or("its training data").to_string();
    let saved: Option<LabelMap> = meta.get("task").and_then(|t| serde_json::from_value(t["labels"].clone()).ok());
    let list = |m: &LabelMap| m.names().join(", ");
    match (model.head.config.kind, &task.labels) {
        (HeadKind::Regression, None) => Ok(()),
        (HeadKind::Regression, Some(l)) => Err(Error::Delta(format!(
            "{}: the delta's head predicts a number (regression, trained on {trained_on}) but {} is a classification task with labels [{}]",
            delta.display(),
            task.name,
            list(l)
        ))),
        (HeadKind::Classification { num_labels }, None) => Err(Error::Delta(format!(
            "{}: the delta's head predicts {num_labels} classes (trained on {trained_on}) but {} is a regression task",
            delta.display(),
            task.name
        ))),
        (HeadKind::Classification { num_labels }, Some(l)) => {
            let same = match &saved {
                Some(s) => s.names() == l.names(),
                None => num_labels == l.len(),
            };
            if same {
                return Ok(());
            }
            let head = saved.as_ref().map(list).unwrap_or_else(|| format!("{num_labels} unnamed classes"));
            Err(Error::Delta(format!(
                "{}: the delta's head predicts labels [{head}] (trained on {trained_on}) but {} has labels [{}]; evaluate it on data with the same labels",
                delta.display(),
                task.name,
                list(l)
            )))
        }
    }
}

/// `deltatune predict`.
#[derive(Clone, Debug)]
pub struct PredictSpec {
    pub model: Option<PathBuf>,
    pub delta: PathBuf,
    /// Texts (with an optional second segment).
    pub texts: Vec<(String, Option<String>)>,
    pub batch_size: usize,
}

/// One prediction: a class with probabilities, or a value.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Prediction {
    Class { index: usize, label: String, label_id: usize, probabilities: Map<String, Value> },
    Value { index: usize, value: f32 },
}

/// Predicts with a loaded task model (the server and Python keep the model between calls).
pub fn predict_with(model: &TaskModel, meta: &Map<String, Value>, texts: &[(String, Option<String>)], batch_size: usize) -> Result<Vec<Prediction>> {
    if batch_size == 0 {
        return Err(Error::arg("--batch-size", "must be at least 1"));
    }
    let labels: Option<LabelMap> = meta.get("task").and_then(|t| serde_json::from_value(t["labels"].clone()).ok());
    let enc = TextEncoder::from_file(&model.backbone.files.tokenizer, max_length(meta))?;
    let mut data = Prepared::default();
    for (t, p) in texts {
        data.encodings.push(enc.encode(t, p.as_deref())?);
        data.targets.push(0.0);
    }
    let (preds, logits, _) = predict_split(model, &data, batch_size, enc.pad_id())?;
    let name = |k: usize| labels.as_ref().and_then(|m| m.name(k)).map(str::to_string).unwrap_or_else(|| k.to_string());
    let mut out = Vec::with_capacity(preds.len());
    for (index, (p, l)) in preds.iter().zip(&logits).enumerate() {
        out.push(match model.head.config.kind {
            HeadKind::Regression => Prediction::Value { index, value: *p },
            HeadKind::Classification { .. } => {
                let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = l.iter().map(|x| (x - m).exp()).collect();
                let s: f32 = e.iter().sum();
                let label_id = *p as usize;
                let probabilities = e.iter().enumerate().map(|(k, v)| (name(k), Value::from(v / s))).collect();
                Prediction::Class { index, label: name(label_id), label_id, probabilities }
            }
        });
    }
    Ok(out)
}

pub fn predict(spec: &PredictSpec, ctl: &Control) -> Result<Vec<Prediction>> {
    let (model, meta) = load_task_model(spec.model.as_deref(), &spec.delta, ctl)?;
    predict_with(&model, &meta, &spec.texts, spec.batch_size)
}
