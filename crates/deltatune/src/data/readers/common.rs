//! Helpers every reader uses to build a [`TaskData`]: the task record, default metrics, and the
//! missing-split error.

use crate::data::task::{Example, LabelMap, MetricKind, TaskData, TaskKind};
use crate::error::Error;
use std::path::Path;

/// A classification task (the regression one overrides `kind`).
pub(crate) fn task_data(
    name: &str,
    labels: Option<LabelMap>,
    train: Vec<Example>,
    dev: Vec<Example>,
    test: Option<Vec<Example>>,
    metrics: Vec<MetricKind>,
    notes: Vec<String>,
) -> TaskData {
    let kind = match &labels {
        Some(m) => TaskKind::Classification { num_labels: m.len() },
        None => TaskKind::Regression,
    };
    TaskData { name: name.to_string(), kind, labels, train, dev, test, metrics, notes }
}

/// Metrics for user data: accuracy then F1 (binary) or macro-F1; Pearson then Spearman for
/// regression (`num_labels == 0`).
pub(crate) fn default_metrics(num_labels: usize) -> Vec<MetricKind> {
    match num_labels {
        0 => vec![MetricKind::Pearson, MetricKind::Spearman],
        2 => vec![MetricKind::Accuracy, MetricKind::F1],
        _ => vec![MetricKind::Accuracy, MetricKind::MacroF1],
    }
}

/// The error for a task whose training split is not on disk.
pub(crate) fn missing_split(file: &Path, task: &str, why: &str, hint: &str) -> Error {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Error::data_file(file, format!("no training split for {task}: {name} {why} present. To train anyway, {hint}"))
}

