//! The user's own data files: CSV (with quotes), TSV (split on tabs) and JSONL, columns picked by
//! header name (or 0-based index in a file without a header). Text that is not valid UTF-8 is kept,
//! decoded lossily, with one warning per file that counts the affected lines. Labels are strings
//! (or numbers, or JSON booleans), or floats for regression.

use super::delimited::{read_csv, read_tsv};
use super::jsonl::read_jsonl;
use super::source::{
    apply_limits, held_out_count, lossy_note, require_examples, split_off, thousands, to_classes, to_reals, Decoding,
    RawExample,
};
use super::common::{default_metrics, task_data};
use crate::data::task::{Example, LabelMap, TaskData, TaskOptions};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A user file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
}

impl Format {
    /// From the extension: `.csv`, `.tsv`/`.tab`, `.jsonl`/`.ndjson` (any case).
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        match ext.as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" | "tab" => Ok(Format::Tsv),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            _ => Err(Error::arg(
                "format",
                format!(
                    "cannot tell the format of {} from its extension (.csv, .tsv, .jsonl); name the format (csv, tsv, jsonl)",
                    path.display()
                ),
            )),
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "jsonl" => Ok(Format::Jsonl),
            _ => Err(Error::arg("--format", format!("unknown format `{s}`; expected csv, tsv or jsonl"))),
        }
    }
}

/// Which columns (CSV/TSV header names or 0-based indices) or keys (JSONL) hold what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Columns {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: String,
}

impl Default for Columns {
    /// `text` and `label`, no pair.
    fn default() -> Self {
        Self { text: "text".into(), text_pair: None, label: "label".into() }
    }
}

impl Columns {
    fn all_indices(&self) -> bool {
        let idx = |s: &str| s.trim().parse::<usize>().is_ok();
        idx(&self.text) && idx(&self.label) && self.text_pair.as_deref().is_none_or(idx)
    }
}

/// How user files are read.
#[derive(Clone, Debug, Default)]
pub struct UserOptions {
    /// Seed, dev fraction and limits, as for named tasks.
    pub split: TaskOptions,
    /// `None`: from the file extension.
    pub format: Option<Format>,
    /// Whether CSV/TSV files start with a header row. `None`: they do, unless every column in
    /// [`Columns`] is a number (then the numbers are 0-based indices into header-less rows).
    pub header: Option<bool>,
    /// Labels are real numbers (regression) instead of class names.
    pub regression: bool,
    /// A fixed label set (e.g. the one saved with a trained model); labels outside it are errors.
    /// `None`: the labels seen in the training file, in natural order.
    pub labels: Option<LabelMap>,
}

/// One user file read on its own (e.g. for evaluation with a saved label map).
#[derive(Clone, Debug)]
pub struct UserSplit {
    pub examples: Vec<Example>,
    /// `None` for regression.
    pub labels: Option<LabelMap>,
    pub notes: Vec<String>,
}

/// Raw rows of one file and its lossy-decoding note.
fn read_raw(path: &Path, cols: &Columns, opts: &UserOptions) -> Result<(Vec<RawExample>, Option<String>)> {
    let format = match opts.format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    let (raw, lossy) = match format {
        Format::Csv | Format::Tsv => {
            let header = opts.header.unwrap_or_else(|| !cols.all_indices());
            let t = match format {
                Format::Csv => read_csv(path, header)?,
                _ => read_tsv(path, Decoding::Lossy, header)?,
            };
            let a = t.column(&cols.text)?;
            let b = cols.text_pair.as_deref().map(|c| t.column(c)).transpose()?;
            let l = t.column(&cols.label)?;
            (t.raw_examples(a, b, l), t.lossy)
        }
        Format::Jsonl => {
            let f = read_jsonl(path, Decoding::Lossy)?;
            (f.raw_examples(&cols.text, cols.text_pair.as_deref(), &cols.label)?, f.lossy)
        }
    };
    require_examples(&raw, path)?;
    if let Some(r) = raw.iter().find(|r| r.label.is_empty()) {
        return Err(Error::data(path, r.line, r.label_col, "empty label"));
    }
    Ok((raw, lossy_note(path, &lossy)))
}

fn convert(raw: Vec<RawExample>, labels: Option<&LabelMap>, path: &Path) -> Result<Vec<Example>> {
    match labels {
        Some(m) => to_classes(raw, m, path),
        None => to_reals(raw, path),
    }
}

/// The label map for a training file: the given one, or the observed labels (at least two).
fn label_map(raw: &[RawExample], path: &Path, opts: &UserOptions) -> Result<Option<LabelMap>> {
    if opts.regression {
        return Ok(None);
    }
    if let Some(m) = &opts.labels {
        return Ok(Some(m.clone()));
    }
    let m = LabelMap::from_observed(raw.iter().map(|r| &r.label))?;
    if m.len() < 2 {
        return Err(Error::data_file(
            path,
            format!("only one label (\"{}\") in the data; a classifier needs at least 2", m.names().join("")),
        ));
    }
    Ok(Some(m))
}

/// Reads one user file: with `opts.labels`, every label must be in it; otherwise the labels seen
/// in the file form the map.
pub fn read_user_split(path: &Path, cols: &Columns, opts: &UserOptions) -> Result<UserSplit> {
    let (raw, note) = read_raw(path, cols, opts)?;
    let labels = label_map(&raw, path, opts)?;
    let examples = convert(raw, labels.as_ref(), path)?;
    Ok(UserSplit { examples, labels, notes: note.into_iter().collect() })
}

/// Loads user training data and, if given, dev data (else a seeded dev split held out of train,
/// both parts in file order). Labels of the dev file must occur in the training labels (or in
/// `opts.labels`).
pub fn load_user(train: &Path, dev: Option<&Path>, cols: &Columns, opts: &UserOptions) -> Result<TaskData> {
    opts.split.validate()?;
    let (raw, note) = read_raw(train, cols, opts)?;
    let labels = label_map(&raw, train, opts)?;
    let train_examples = convert(raw, labels.as_ref(), train)?;
    let mut notes: Vec<String> = note.into_iter().collect();
    let (train_examples, dev_examples) = match dev {
        Some(dev) => {
            let (raw, note) = read_raw(dev, cols, opts)?;
            notes.extend(note);
            (train_examples, convert(raw, labels.as_ref(), dev)?)
        }
        None => {
            let n = train_examples.len();
            let k = held_out_count(n, opts.split.dev_fraction);
            notes.push(format!(
                "dev: {} of the {} training examples held out at random (seed {}, fraction {})",
                thousands(k),
                thousands(n),
                opts.split.seed,
                opts.split.dev_fraction
            ));
            split_off(train_examples, k, opts.split.seed, train)?
        }
    };
    if let Some(m) = labels.as_ref().filter(|m| m.len() == 2) {
        notes.push(format!("f1 is computed for the label \"{}\" (index 1)", m.names().get(1).map_or("", |s| s)));
    }
    let name = train.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    let metrics = match &labels {
        Some(m) => default_metrics(m.len()),
        None => default_metrics(0),
    };
    // No label map means regression: task_data sets the kind from it.
    let mut data = task_data(&name, labels, train_examples, dev_examples, None, metrics, notes);
    apply_limits(&mut data, &opts.split);
    Ok(data)
}

/// Reads only the text columns of a user file (new data to predict on; no label needed), with
/// lossy UTF-8 decoding. Returns the texts and a note when lines needed replacement.
pub fn read_texts(path: &Path, text: &str, text_pair: Option<&str>, format: Option<Format>) -> Result<(Vec<(String, Option<String>)>, Option<String>)> {
    let format = match format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    let cols = Columns { text: text.to_string(), text_pair: text_pair.map(str::to_string), label: text.to_string() };
    let (raw, lossy) = match format {
        Format::Csv | Format::Tsv => {
            let header = !cols.all_indices();
            let t = match format {
                Format::Csv => read_csv(path, header)?,
                _ => read_tsv(path, Decoding::Lossy, header)?,
            };
            let a = t.column(&cols.text)?;
            let b = cols.text_pair.as_deref().map(|c| t.column(c)).transpose()?;
            // The label slot repeats the text column: labels are not read.
            (t.raw_examples(a, b, a), t.lossy)
        }
        Format::Jsonl => {
            let f = read_jsonl(path, Decoding::Lossy)?;
            (f.raw_examples(&cols.text, cols.text_pair.as_deref(), &cols.text)?, f.lossy)
        }
    };
    require_examples(&raw, path)?;
    Ok((raw.into_iter().map(|r| (r.text_a, r.text_b)).collect(), lossy_note(path, &lossy)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::task::{Label, TaskKind};

    #[test]
    fn formats_and_columns() {
        assert_eq!(Format::from_path(Path::new("a.CSV")).unwrap(), Format::Csv);
        assert_eq!(Format::from_path(Path::new("a.ndjson")).unwrap(), Format::Jsonl);
        let err = Format::from_path(Path::new("a.txt")).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid format: cannot tell the format of a.txt from its extension (.csv, .tsv, .jsonl); name the format (csv, tsv, jsonl)"
        );
        assert_eq!("TSV".parse::<Format>().unwrap(), Format::Tsv);
        assert!(Columns { text: "0".into(), text_pair: Some("2".into()), label: "1".into() }.all_indices());
        assert!(!Columns::default().all_indices());
    }

    #[test]
    fn headerless_tsv_by_index_and_regression() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("scores.tsv");
        std::fs::write(&p, "a\tb\t0.5\nc\td\t4\ne\tf\t2.25\n").unwrap();
        let cols = Columns { text: "0".into(), text_pair: Some("1".into()), label: "2".into() };
        let opts = UserOptions { regression: true, ..Default::default() };
        let t = load_user(&p, Some(&p), &cols, &opts).unwrap();
        assert_eq!(t.kind, TaskKind::Regression);
        assert!(t.labels.is_none());
        assert_eq!(t.train[2], Example { text_a: "e".into(), text_b: Some("f".into()), label: Label::Real(2.25) });
        assert_eq!(t.name, "scores");
    }
}
