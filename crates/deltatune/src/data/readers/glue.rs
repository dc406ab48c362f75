//! GLUE tasks from their original TSV files: SST-2, CoLA (raw cola_public), MRPC (the two raw MSR
//! files), RTE, STS-B and QNLI. Files are strict UTF-8, tab-separated with no quote handling.
//! GLUE test files carry no labels and are not loaded. The task table is in `mod.rs`.

use super::delimited::read_tsv;
use super::source::{require_examples, split_off, thousands, to_classes, to_reals, Decoding};
use super::common::{missing_split, task_data};
use crate::data::task::{Example, LabelMap, MetricKind, TaskData, TaskKind, TaskOptions};
use crate::error::Result;
use std::path::Path;

/// GLUE's MRPC dev set size (pairs GLUE moves from the MSR train file into dev.tsv).
const MRPC_DEV_SIZE: usize = 408;

const UNLABELLED_TEST: &str = "test.tsv has no labels (scored by the GLUE server) and is not loaded";

/// Reads one TSV split. `labels: None` reads the label column as a real number.
fn tsv_split(
    path: &Path,
    header: bool,
    text_a: &str,
    text_b: Option<&str>,
    label: &str,
    labels: Option<&LabelMap>,
) -> Result<Vec<Example>> {
    let t = read_tsv(path, Decoding::Utf8, header)?;
    let a = t.column(text_a)?;
    let b = text_b.map(|c| t.column(c)).transpose()?;
    let l = t.column(label)?;
    let raw = t.raw_examples(a, b, l);
    require_examples(&raw, path)?;
    match labels {
        Some(m) => to_classes(raw, m, path),
        None => to_reals(raw, path),
    }
}

fn binary() -> Result<LabelMap> {
    LabelMap::new(["0", "1"])
}

fn entailment() -> Result<LabelMap> {
    LabelMap::new(["entailment", "not_entailment"])
}

pub(super) fn sst2(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    let labels = binary()?;
    let split = |f: &str| tsv_split(&dir.join(f), true, "sentence", None, "label", Some(&labels));
    let (train, dev) = (split("train.tsv")?, split("dev.tsv")?);
    Ok(task_data("sst2", Some(labels), train, dev, None, vec![MetricKind::Accuracy], vec![UNLABELLED_TEST.into()]))
}

pub(super) fn cola(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    // cola_public has no header: source, label, original mark, sentence.
    let labels = binary()?;
    let split = |f: &str| tsv_split(&dir.join(f), false, "3", None, "1", Some(&labels));
    let train = split("in_domain_train.tsv")?;
    let mut dev = split("in_domain_dev.tsv")?;
    dev.extend(split("out_of_domain_dev.tsv")?);
    let notes = vec![
        "dev: in_domain_dev.tsv followed by out_of_domain_dev.tsv (= GLUE's dev.tsv); GLUE's test set is not included"
            .into(),
    ];
    Ok(task_data("cola", Some(labels), train, dev, None, vec![MetricKind::Matthews, MetricKind::Accuracy], notes))
}

pub(super) fn mrpc(dir: &Path, opts: &TaskOptions) -> Result<TaskData> {
    let labels = binary()?;
    let split = |f: &str| tsv_split(&dir.join(f), true, "#1 String", Some("#2 String"), "Quality", Some(&labels));
    let train_file = dir.join("msr_paraphrase_train.txt");
    let all = split("msr_paraphrase_train.txt")?;
    let n = all.len();
    let (train, dev) = split_off(all, MRPC_DEV_SIZE, opts.seed, &train_file)?;
    let test = split("msr_paraphrase_test.txt")?;
    let notes = vec![format!(
        "dev: {MRPC_DEV_SIZE} of the {} pairs of msr_paraphrase_train.txt held out at random (seed {}), the size of \
         GLUE's dev set; GLUE's own dev id list is not available, so scores are not comparable to GLUE dev",
        thousands(n),
        opts.seed
    )];
    let metrics = vec![MetricKind::F1, MetricKind::Accuracy];
    Ok(task_data("mrpc", Some(labels), train, dev, Some(test), metrics, notes))
}

pub(super) fn rte(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    let labels = entailment()?;
    let split = |f: &str| tsv_split(&dir.join(f), true, "sentence1", Some("sentence2"), "label", Some(&labels));
    let (train, dev) = (split("train.tsv")?, split("dev.tsv")?);
    Ok(task_data("rte", Some(labels), train, dev, None, vec![MetricKind::Accuracy], vec![UNLABELLED_TEST.into()]))
}

pub(super) fn stsb(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    let split = |f: &str| tsv_split(&dir.join(f), true, "sentence1", Some("sentence2"), "score", None);
    let (train, dev) = (split("train.tsv")?, split("dev.tsv")?);
    Ok(TaskData {
        kind: TaskKind::Regression,
        ..task_data(
            "stsb",
            None,
            train,
            dev,
            None,
            vec![MetricKind::Pearson, MetricKind::Spearman],
            vec![UNLABELLED_TEST.into()],
        )
    })
}

/// QNLI's train.tsv is not in the shared data (over 4 MiB); it is read when someone adds it.
/// Otherwise this is an error rather than a split held out of dev: a model selected on part of
/// GLUE's dev set and scored on the rest would not be comparable with anything.
pub(super) fn qnli(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    let labels = entailment()?;
    let train_file = dir.join("train.tsv");
    if !train_file.exists() {
        return Err(missing_split(
            &train_file,
            "QNLI",
            "is not part of the shared data (the file is over 4 MiB); only dev.tsv and an unlabelled test.tsv are",
            "load dev.tsv as user data (columns question, sentence, label), which holds out its own dev split",
        ));
    }
    let split = |f: &str| tsv_split(&dir.join(f), true, "question", Some("sentence"), "label", Some(&labels));
    let (train, dev) = (split("train.tsv")?, split("dev.tsv")?);
    Ok(task_data("qnli", Some(labels), train, dev, None, vec![MetricKind::Accuracy], vec![UNLABELLED_TEST.into()]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::task::Label;

    #[test]
    fn sst2_from_a_small_copy() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("train.tsv"), "sentence\tlabel\ngood \t1\nbad \t0\n").unwrap();
        std::fs::write(d.path().join("dev.tsv"), "sentence\tlabel\nfine\t1\n").unwrap();
        let t = sst2(d.path(), &TaskOptions::default()).unwrap();
        assert_eq!(t.train[0], Example { text_a: "good".into(), text_b: None, label: Label::Class(1) });
        assert_eq!(t.dev.len(), 1);
        std::fs::write(d.path().join("dev.tsv"), "sentence\tlabel\nfine\t2\n").unwrap();
        let err = sst2(d.path(), &TaskOptions::default()).unwrap_err().to_string();
        assert!(err.ends_with("dev.tsv:2:2: unknown label \"2\"; known labels: 0, 1"), "{err}");
    }

    #[test]
    fn stsb_labels_are_real() {
        let d = tempfile::tempdir().unwrap();
        let h = "index\tsentence1\tsentence2\tscore\n";
        std::fs::write(d.path().join("train.tsv"), format!("{h}0\ta\tb\t3.800\n")).unwrap();
        std::fs::write(d.path().join("dev.tsv"), format!("{h}0\ta\tb\tx\n")).unwrap();
        let err = stsb(d.path(), &TaskOptions::default()).unwrap_err().to_string();
        assert!(err.ends_with("dev.tsv:2:4: cannot parse label \"x\" as a number"), "{err}");
        std::fs::write(d.path().join("dev.tsv"), format!("{h}0\ta\tb\t1.5\n")).unwrap();
        let t = stsb(d.path(), &TaskOptions::default()).unwrap();
        assert_eq!(t.kind, TaskKind::Regression);
        assert_eq!(t.train[0].label, Label::Real(3.8));
        assert_eq!(t.train[0].text_b.as_deref(), Some("b"));
    }
}
