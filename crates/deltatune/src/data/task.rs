//! The data model every reader produces: examples, labels, label maps, the kind of task, the
//! metrics it is scored with, and the options that control splits and subsets. Reading files is in
//! [`crate::data::readers`]; computing metrics is in [`crate::train::metrics`].

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The gold label of one example.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// An index into the task's [`LabelMap`].
    Class(usize),
    /// A regression target (e.g. STS-B similarity, 0–5).
    Real(f32),
}

impl Label {
    pub fn class(self) -> Option<usize> {
        match self {
            Label::Class(c) => Some(c),
            Label::Real(_) => None,
        }
    }

    pub fn real(self) -> Option<f32> {
        match self {
            Label::Real(r) => Some(r),
            Label::Class(_) => None,
        }
    }
}

/// One text (or text pair) with its label.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text_a: String,
    pub text_b: Option<String>,
    pub label: Label,
}

/// What the head predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Classification { num_labels: usize },
    Regression,
}

/// Label strings ↔ class indices, in a fixed order that is saved with a run.
///
/// Serialized as the plain list of names (`["entailment", "not_entailment"]`); deserializing
/// rejects empty lists and duplicates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct LabelMap {
    names: Vec<String>,
    index: BTreeMap<String, usize>,
}

impl LabelMap {
    /// A map in exactly the given order (a benchmark's canonical order, or a saved run's).
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Result<Self> {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        if names.is_empty() {
            return Err(Error::arg("labels", "the label set is empty"));
        }
        let mut index = BTreeMap::new();
        for (i, n) in names.iter().enumerate() {
            if index.insert(n.clone(), i).is_some() {
                return Err(Error::arg("labels", format!("label \"{n}\" appears twice")));
            }
        }
        Ok(Self { names, index })
    }

    /// The labels seen in user data, in natural order: numerically when every label is an
    /// integer (`"2" < "10"`), otherwise by byte-wise string order. Duplicates collapse.
    pub fn from_observed<S: AsRef<str>>(labels: impl IntoIterator<Item = S>) -> Result<Self> {
        let set: BTreeSet<String> = labels.into_iter().map(|s| s.as_ref().to_string()).collect();
        let as_ints: Option<Vec<(i64, String)>> =
            set.iter().map(|s| s.parse::<i64>().ok().map(|v| (v, s.clone()))).collect();
        match as_ints {
            Some(mut v) => {
                // Ties ("1" and "01") fall back to the string, so the order stays total.
                v.sort();
                Self::new(v.into_iter().map(|(_, s)| s))
            }
            None => Self::new(set),
        }
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn name(&self, index: usize) -> Option<&str> {
        self.names.get(index).map(String::as_str)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

impl TryFrom<Vec<String>> for LabelMap {
    type Error = Error;
    fn try_from(names: Vec<String>) -> Result<Self> {
        Self::new(names)
    }
}

impl From<LabelMap> for Vec<String> {
    fn from(m: LabelMap) -> Self {
        m.names
    }
}

/// How a task is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    Accuracy,
    /// Binary F1 of class index 1.
    F1,
    /// Unweighted mean of per-class F1.
    MacroF1,
    /// Matthews correlation coefficient (multiclass form).
    Matthews,
    Pearson,
    Spearman,
}

impl MetricKind {
    /// The serde name (`"macro_f1"`).
    pub fn name(self) -> &'static str {
        match self {
            MetricKind::Accuracy => "accuracy",
            MetricKind::F1 => "f1",
            MetricKind::MacroF1 => "macro_f1",
            MetricKind::Matthews => "matthews",
            MetricKind::Pearson => "pearson",
            MetricKind::Spearman => "spearman",
        }
    }
}

impl std::fmt::Display for MetricKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A task read from disk, split and (optionally) subset.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub name: String,
    pub kind: TaskKind,
    /// `None` for regression.
    pub labels: Option<LabelMap>,
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    /// Only labelled test sets (GLUE/SuperGLUE test files have no labels and are not loaded).
    pub test: Option<Vec<Example>>,
    /// The first one is used for model selection.
    pub metrics: Vec<MetricKind>,
    /// How the data was split, subset or decoded (e.g. "dev: 10% of train, seed 42").
    pub notes: Vec<String>,
}

impl TaskData {
    /// Examples per class index of `split` (all zeros for a regression task).
    pub fn class_counts(&self, split: &[Example]) -> Vec<usize> {
        let n = match self.kind {
            TaskKind::Classification { num_labels } => num_labels,
            TaskKind::Regression => 0,
        };
        let mut counts = vec![0; n];
        for e in split {
            if let Some(c) = e.label.class().and_then(|c| counts.get_mut(c)) {
                *c += 1;
            }
        }
        counts
    }
}

/// How named tasks and user data are split and subset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskOptions {
    /// Seed of every held-out split (independent of the training seed's other uses).
    pub seed: u64,
    /// Fraction held out for dev where a data set has no dev split (and for test where it has
    /// neither). Must be in (0, 1).
    pub dev_fraction: f32,
    /// Keep only the first N training examples (file order, after any dev split is held out).
    pub max_train: Option<usize>,
    /// Keep only the first N dev examples.
    pub max_dev: Option<usize>,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self { seed: 42, dev_fraction: 0.1, max_train: None, max_dev: None }
    }
}

impl TaskOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.dev_fraction > 0.0 && self.dev_fraction < 1.0) {
            return Err(Error::arg("--dev-fraction", format!("{} is not in (0, 1)", self.dev_fraction)));
        }
        if self.max_train == Some(0) {
            return Err(Error::arg("--max-train", "must be at least 1"));
        }
        if self.max_dev == Some(0) {
            return Err(Error::arg("--max-dev", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_label_order() {
        let m = LabelMap::from_observed(["10", "2", "-1", "2"]).unwrap();
        assert_eq!(m.names(), ["-1", "2", "10"]);
        let m = LabelMap::from_observed(["pos", "neg", "10", "2"]).unwrap();
        assert_eq!(m.names(), ["10", "2", "neg", "pos"]);
        assert_eq!(m.index("neg"), Some(2));
        assert_eq!(m.name(3), Some("pos"));
        assert_eq!(m.name(4), None);
        assert_eq!(m.index("x"), None);
    }

    #[test]
    fn label_map_serde_round_trip_and_validation() {
        let m = LabelMap::new(["entailment", "not_entailment"]).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"["entailment","not_entailment"]"#);
        let back: LabelMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        let dup = serde_json::from_str::<LabelMap>(r#"["a","b","a"]"#).unwrap_err();
        assert!(dup.to_string().contains(r#"label "a" appears twice"#), "{dup}");
        assert!(serde_json::from_str::<LabelMap>("[]").is_err());
    }

    #[test]
    fn metric_names_match_serde() {
        for m in [
            MetricKind::Accuracy,
            MetricKind::F1,
            MetricKind::MacroF1,
            MetricKind::Matthews,
            MetricKind::Pearson,
            MetricKind::Spearman,
        ] {
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
    }

    #[test]
    fn options_validate() {
        assert!(TaskOptions::default().validate().is_ok());
        let bad = TaskOptions { dev_fraction: 1.0, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().to_string(), "invalid --dev-fraction: 1 is not in (0, 1)");
        let bad = TaskOptions { max_train: Some(0), ..Default::default() };
        assert!(bad.validate().is_err());
    }
}
