//! One example per line, the raw sentence-classification releases: TREC (`COARSE:fine question`),
//! SST-5 (`<label> <sentence>`), and the two-file sets MR, CR, SUBJ and MPQA, whose label is the
//! file an example is in. Latin-1 where the data README says so. The task table is in `mod.rs`.

use super::source::{
    decode_lines, held_out_count, read_bytes, require_examples, shuffled, split_off, thousands, to_classes, Decoding,
    RawExample,
};
use super::common::task_data;
use crate::data::task::{Example, Label, LabelMap, MetricKind, TaskData, TaskOptions};
use crate::error::{Error, Result};
use std::path::Path;

/// Non-blank lines of a file, with their line numbers.
fn nonblank_lines(path: &Path, decoding: Decoding) -> Result<Vec<(usize, String)>> {
    let bytes = read_bytes(path, "data file")?;
    let lines = decode_lines(&bytes, path, decoding)?;
    Ok(lines.lines.into_iter().filter(|(_, l)| !l.trim().is_empty()).collect())
}

/// Lines of the form `<label> <text>`; `label_of` picks the label out of the first token.
fn label_first(path: &Path, decoding: Decoding, label_of: fn(&str) -> &str) -> Result<Vec<RawExample>> {
    let raw = nonblank_lines(path, decoding)?
        .into_iter()
        .map(|(line, l)| match l.trim().split_once(' ') {
            Some((tok, text)) => Ok(RawExample {
                line,
                label_col: Some(1),
                text_a: text.trim().to_string(),
                text_b: None,
                label: label_of(tok).to_string(),
            }),
            None => Err(Error::data(path, line, None, "expected `<label> <text>` separated by a space")),
        })
        .collect::<Result<Vec<_>>>()?;
    require_examples(&raw, path)?;
    Ok(raw)
}

/// TREC, 6 coarse classes: train is TREC.train minus a seeded dev split, test is TREC.test.
pub(super) fn trec(dir: &Path, opts: &TaskOptions) -> Result<TaskData> {
    let labels = LabelMap::new(["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])?;
    fn coarse(tok: &str) -> &str {
        tok.split(':').next().unwrap_or(tok)
    }
    let read = |f: &str| {
        let path = dir.join(f);
        to_classes(label_first(&path, Decoding::Latin1, coarse)?, &labels, &path)
    };
    let all = read("TREC.train")?;
    let n = all.len();
    let n_dev = held_out_count(n, opts.dev_fraction);
    let (train, dev) = split_off(all, n_dev, opts.seed, &dir.join("TREC.train"))?;
    let test = read("TREC.test")?;
    let notes = vec![
        "labels: the 6 coarse classes (the part of the label before `:`)".into(),
        format!(
            "dev: {} of the {} questions of TREC.train held out at random (seed {}, fraction {}); test: TREC.test",
            thousands(n_dev),
            thousands(n),
            opts.seed,
            opts.dev_fraction
        ),
    ];
    Ok(task_data("trec", Some(labels), train, dev, Some(test), vec![MetricKind::Accuracy], notes))
}

/// SST-5 (sentence level, as preprocessed by Kim 2014): labelled train, dev and test files.
pub(super) fn sst5(dir: &Path, _opts: &TaskOptions) -> Result<TaskData> {
    let labels = LabelMap::new(["0", "1", "2", "3", "4"])?;
    let read = |f: &str| {
        let path = dir.join(f);
        to_classes(label_first(&path, Decoding::Utf8, |t| t)?, &labels, &path)
    };
    let (train, dev, test) = (read("stsa.fine.train")?, read("stsa.fine.dev")?, read("stsa.fine.test")?);
    Ok(task_data("sst5", Some(labels), train, dev, Some(test), vec![MetricKind::Accuracy], Vec::new()))
}

/// A two-file data set: `files` lists (file name, label index) with label 0 first.
fn two_file(dir: &Path, name: &str, files: [(&str, usize); 2], opts: &TaskOptions) -> Result<TaskData> {
    let labels = LabelMap::new(["0", "1"])?;
    let mut all = Vec::new();
    for (file, class) in files {
        let path = dir.join(file);
        let lines = nonblank_lines(&path, Decoding::Latin1)?;
        require_examples(&lines, &path)?;
        all.extend(lines.into_iter().map(|(_, text)| Example {
            text_a: text.trim().to_string(),
            text_b: None,
            label: Label::Class(class),
        }));
    }
    let n = all.len();
    let k = held_out_count(n, opts.dev_fraction);
    if n < 2 * k + 1 {
        return Err(Error::data_file(dir, format!("{n} examples are too few for a train/dev/test split")));
    }
    let mut rest = shuffled(all, opts.seed);
    let dev: Vec<Example> = rest.drain(..k).collect();
    let test: Vec<Example> = rest.drain(..k).collect();
    let train = rest;
    let [(f0, _), (f1, _)] = files;
    let notes = vec![format!(
        "no standard split (the usual protocol is 10-fold cross-validation): the lines of {f0} (label 0) and {f1} \
         (label 1) shuffled with seed {}, then dev = the first {} (fraction {}), test = the next {}, train = the \
         remaining {}; every split is in that shuffled order",
        opts.seed,
        thousands(k),
        opts.dev_fraction,
        thousands(k),
        thousands(train.len())
    )];
    Ok(task_data(name, Some(labels), train, dev, Some(test), vec![MetricKind::Accuracy], notes))
}

pub(super) fn mr(dir: &Path, opts: &TaskOptions) -> Result<TaskData> {
    two_file(dir, "mr", [("rt-polarity.neg", 0), ("rt-polarity.pos", 1)], opts)
}

pub(super) fn cr(dir: &Path, opts: &TaskOptions) -> Result<TaskData> {
    two_file(dir, "cr", [("custrev.neg", 0), ("custrev.pos", 1)], opts)
}

pub(super) fn subj(dir: &Path, opts: &TaskOptions) -> Result<TaskData> {
    two_file(dir, "subj", [("subj.objective", 0), ("subj.subjective", 1)], opts)
}

pub(super) fn mpqa(dir: &Path, opts: &TaskOptions) -> Result<TaskData> {
    two_file(dir, "mpqa", [("mpqa.neg", 0), ("mpqa.pos", 1)], opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trec_coarse_labels_latin1_and_seeded_dev() {
        let d = tempfile::tempdir().unwrap();
        let mut train = Vec::new();
        for i in 0..20 {
            train.extend_from_slice(format!("LOC:city Which city {i} ").as_bytes());
            train.extend_from_slice(b"\xe9 ?\n");
        }
        train.extend_from_slice(b"NUM:date When ?\n");
        std::fs::write(d.path().join("TREC.train"), &train).unwrap();
        std::fs::write(d.path().join("TREC.test"), b"HUM:ind Who ?\n\n").unwrap();
        let t = trec(d.path(), &TaskOptions::default()).unwrap();
        assert_eq!((t.train.len(), t.dev.len(), t.test.as_ref().unwrap().len()), (19, 2, 1));
        assert_eq!(t.test.as_ref().unwrap()[0].label, Label::Class(3));
        assert!(t.train.iter().chain(&t.dev).any(|e| e.text_a == "Which city 0 \u{e9} ?"));
        std::fs::write(d.path().join("TREC.test"), b"XYZ:ind Who ?\n").unwrap();
        let err = trec(d.path(), &TaskOptions::default()).unwrap_err().to_string();
        assert!(
            err.ends_with("TREC.test:1:1: unknown label \"XYZ\"; known labels: ABBR, DESC, ENTY, HUM, LOC, NUM"),
            "{err}"
        );
        std::fs::write(d.path().join("TREC.test"), b"HUM:ind\n").unwrap();
        let err = trec(d.path(), &TaskOptions::default()).unwrap_err().to_string();
        assert!(err.ends_with("TREC.test:1: expected `<label> <text>` separated by a space"), "{err}");
    }

    #[test]
    fn two_file_split_is_mixed_and_seeded() {
        let d = tempfile::tempdir().unwrap();
        let lines = |p: &str| (0..50).map(|i| format!("{p} {i}\n")).collect::<String>();
        std::fs::write(d.path().join("custrev.neg"), lines("bad") + "\n").unwrap();
        std::fs::write(d.path().join("custrev.pos"), lines("good")).unwrap();
        let opts = TaskOptions::default();
        let t = cr(d.path(), &opts).unwrap();
        assert_eq!((t.train.len(), t.dev.len(), t.test.as_ref().unwrap().len()), (80, 10, 10));
        let first: Vec<&Label> = t.train.iter().take(20).map(|e| &e.label).collect();
        assert!(first.contains(&&Label::Class(0)) && first.contains(&&Label::Class(1)));
        assert_eq!(cr(d.path(), &opts).unwrap().dev, t.dev);
        let other = cr(d.path(), &TaskOptions { seed: 1, ..opts }).unwrap();
        assert_ne!(other.dev, t.dev);
    }
}
