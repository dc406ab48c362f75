//! From task data to what the loop consumes: tokenized splits with numeric targets, and a scorer
//! computing the task's metrics (the first one selects checkpoints).

use super::metrics::{compute_all, Predictions};
use super::prepared::{Prepared, Scores};
use crate::data::task::{Example, Label, MetricKind, TaskData, TaskKind};
use crate::data::tokenize::TextEncoder;
use crate::error::{Error, Result};
use crate::head::HeadKind;
use std::collections::BTreeMap;

/// Tokenizes `examples` (truncated to the encoder's max length).
pub fn prepare_split(examples: &[Example], enc: &TextEncoder) -> Result<Prepared> {
    let mut p = Prepared::default();
    for e in examples {
        p.encodings.push(enc.encode(&e.text_a, e.text_b.as_deref())?);
        p.targets.push(match e.label {
            Label::Class(c) => c as f32,
            Label::Real(r) => r,
        });
    }
    Ok(p)
}

/// The head kind a task needs.
pub fn head_kind(kind: TaskKind) -> HeadKind {
    match kind {
        TaskKind::Classification { num_labels } => HeadKind::Classification { num_labels },
        TaskKind::Regression => HeadKind::Regression,
    }
}

/// Scores predictions (class indices as floats, or values) with `metrics`.
pub fn score(kind: TaskKind, metrics: &[MetricKind], preds: &[f32], gold: &[f32]) -> Result<Scores> {
    let first = *metrics.first().ok_or_else(|| Error::Delta("the task names no metric".into()))?;
    let (p, g): (Predictions, Vec<Label>) = match kind {
        TaskKind::Classification { .. } => (
            Predictions::Classes(preds.iter().map(|&x| x as usize).collect()),
            gold.iter().map(|&x| Label::Class(x as usize)).collect(),
        ),
        TaskKind::Regression => (Predictions::Scores(preds.to_vec()), gold.iter().map(|&x| Label::Real(x)).collect()),
    };
    let values: BTreeMap<String, f64> = compute_all(metrics, &p, &g)?.into_iter().map(|(k, v)| (k.name().to_string(), v)).collect();
    Ok(Scores { primary: first.name().to_string(), values })
}

/// A scorer closure for `task`.
pub fn scorer(task: &TaskData) -> impl Fn(&[f32], &[f32]) -> Result<Scores> + '_ {
    move |p, g| score(task.kind, &task.metrics, p, g)
}
