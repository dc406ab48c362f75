//! SuperGLUE tasks from their JSONL files (`train.jsonl`, `val.jsonl`; `test.jsonl` has no labels
//! and is not loaded): CB, RTE, BoolQ and WiC. BoolQ and WiC have no train split in the shared data
//! and load only when one is added; COPA is multiple choice and is rejected. The task table is in
//! `mod.rs`.

use super::jsonl::read_jsonl;
use super::source::{require_examples, to_classes, Decoding, RawExample};
use super::common::{missing_split, task_data};
use crate::data::task::{Example, LabelMap, MetricKind, TaskData, TaskOptions};
use crate::error::{Error, Result};
use std::path::Path;

const UNLABELLED_TEST: &str = "test.jsonl has no labels (scored by the SuperGLUE server) and is not loaded";

/// Reads one split; with `prefix_key`, that key's value is put in front of text_a (`"word: text"`).
fn jsonl_split(path: &Path, a: &str, b: &str, labels: &LabelMap, prefix_key: Option<&str>) -> Result<Vec<Example>> {
    let f = read_jsonl(path, Decoding::Utf8)?;
    let mut raw: Vec<RawExample> = f.raw_examples(a, Some(b), "label")?;
    if let Some(key) = prefix_key {
        for (r, row) in raw.iter_mut().zip(&f.rows) {
            r.text_a = format!("{}: {}", f.text(row, key)?, r.text_a);
        }
    }
    require_examples(&raw, path)?;
    to_classes(raw, labels, path)
}

fn pair_task(
    dir: &Path,
    name: &str,
    (a, b): (&str, &str),
    labels: LabelMap,
    metrics: Vec<MetricKind>,
) -> Result<TaskData> {
    let train = jsonl_split(&dir.join("train.jsonl"), a, b, &labels, None)?;
    let dev = jsonl_split(&dir.join("val.jsonl"), a, b, &labels, None)?;
    let notes = vec![format!("dev: val.jsonl; {UNLABELLED_TEST}")];
    Ok(task_data(name, Some(labels), train, dev, None, metrics, notes))
}

pub(super) fn cb(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    let labels = LabelMap::new(["entailment", "contradiction", "neutral"])?;
    pair_task(dir, "cb", ("premise", "hypothesis"), labels, vec![MetricKind::Accuracy, MetricKind::MacroF1])
}

pub(super) fn rte(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    let labels = LabelMap::new(["entailment", "not_entailment"])?;
    pair_task(dir, "superglue-rte", ("premise", "hypothesis"), labels, vec![MetricKind::Accuracy])
}

fn require_train(dir: &Path, task: &str) -> Result<()> {
    let train = dir.join("train.jsonl");
    if train.exists() {
        return Ok(());
    }
    Err(missing_split(
        &train,
        task,
        "is not part of the shared data; only val.jsonl and an unlabelled test.jsonl are",
        "add a train.jsonl in the SuperGLUE format, or load a labelled file as user data",
    ))
}

/// BoolQ: question / passage, labels `false` / `true` (JSON booleans or strings).
pub(super) fn boolq(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    require_train(dir, "BoolQ")?;
    let labels = LabelMap::new(["false", "true"])?;
    pair_task(dir, "boolq", ("question", "passage"), labels, vec![MetricKind::Accuracy])
}

/// WiC: the target word is prefixed to sentence 1 (`"word: sentence1"`), sentence 2 is the pair.
pub(super) fn wic(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    require_train(dir, "WiC")?;
    let labels = LabelMap::new(["false", "true"])?;
    let split = |f: &str| jsonl_split(&dir.join(f), "sentence1", "sentence2", &labels, Some("word"));
    let (train, dev) = (split("train.jsonl")?, split("val.jsonl")?);
    let notes = vec![
        "text_a is \"<word>: <sentence1>\" so that the model sees the target word".into(),
        format!("dev: val.jsonl; {UNLABELLED_TEST}"),
    ];
    Ok(task_data("wic", Some(labels), train, dev, None, vec![MetricKind::Accuracy], notes))
}

pub(super) fn copa(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    Err(Error::data_file(
        dir,
        "COPA is not supported: it is a multiple-choice task (a premise and two candidate choices), not \
         sentence(-pair) classification; the shared data also has no COPA train split",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::task::Label;

    #[test]
    fn wic_prefix_and_missing_train() {
        let d = tempfile::tempdir().unwrap();
        let row = r#"{"word": "class", "sentence1": "A class.", "sentence2": "Real class.", "label": false}"#;
        std::fs::write(d.path().join("val.jsonl"), format!("{row}\n")).unwrap();
        let err = wic(d.path(), &TaskOptions::default()).unwrap_err().to_string();
        assert!(
            err.contains("train.jsonl: no training split for WiC: train.jsonl is not part of the shared data"),
            "{err}"
        );
        std::fs::write(d.path().join("train.jsonl"), row.replace("false", "\"true\"")).unwrap();
        let t = wic(d.path(), &TaskOptions::default()).unwrap();
        assert_eq!(t.train[0].text_a, "class: A class.");
        assert_eq!(t.train[0].label, Label::Class(1));
        assert_eq!(t.dev[0].label, Label::Class(0));
    }
}
