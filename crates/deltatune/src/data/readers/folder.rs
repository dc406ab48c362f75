//! Folder-per-class data (`<root>/<label>/<one text file per example>`, how the BBC News demo data
//! ships). Folders and files are read in sorted order and hidden entries (`.name`) are skipped, so
//! the result does not depend on the file system's listing order. There is no dev split on disk:
//! one is held out at random with the task seed.

use super::source::{apply_limits, held_out_count, shuffled, thousands};
use super::common::{default_metrics, task_data};
use crate::data::task::{Example, Label, LabelMap, TaskData, TaskOptions};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Non-hidden entries of `dir` for which `keep` holds, sorted by name.
fn sorted_entries(dir: &Path, keep: fn(&Path) -> bool) -> Result<Vec<(String, PathBuf)>> {
    let read = std::fs::read_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { path: dir.to_path_buf(), what: "data folder".into() },
        _ => Error::io(dir, e),
    })?;
    let mut out = Vec::new();
    for entry in read {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        if !name.starts_with('.') && keep(&path) {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Loads `root/<label>/*`: one example per file, the label from its folder. Labels are ordered
/// naturally (numerically when every folder name is an integer).
pub fn load_folder(root: &Path, opts: &TaskOptions) -> Result<TaskData> {
    opts.validate()?;
    let classes = sorted_entries(root, |p| p.is_dir())?;
    if classes.len() < 2 {
        return Err(Error::data_file(
            root,
            format!(
                "found {} class folder(s); need at least 2 (one subfolder per label, one file per example)",
                classes.len()
            ),
        ));
    }
    let labels = LabelMap::from_observed(classes.iter().map(|(n, _)| n))?;
    let mut all = Vec::new();
    let mut lossy: Vec<String> = Vec::new();
    for (class, name) in labels.names().iter().enumerate() {
        let Some((_, dir)) = classes.iter().find(|(n, _)| n == name) else { continue };
        let files = sorted_entries(dir, |p| p.is_file())?;
        if files.is_empty() {
            return Err(Error::data_file(dir, "no files: every class folder needs at least one example"));
        }
        for (file, path) in files {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let text = match String::from_utf8(bytes) {
                Ok(s) => s,
                Err(e) => {
                    lossy.push(format!("{name}/{file}"));
                    String::from_utf8_lossy(e.as_bytes()).into_owned()
                }
            };
            all.push(Example { text_a: text.trim().to_string(), text_b: None, label: Label::Class(class) });
        }
    }
    let n = all.len();
    let n_dev = held_out_count(n, opts.dev_fraction);
    let mut train = shuffled(all, opts.seed);
    let dev: Vec<Example> = train.drain(..n_dev).collect();
    let mut notes = vec![format!(
        "dev: {} of the {} files held out at random (seed {}, fraction {}); train and dev are in that shuffled order",
        thousands(n_dev),
        thousands(n),
        opts.seed,
        opts.dev_fraction
    )];
    if let Some(first) = lossy.first() {
        let s = if lossy.len() == 1 { "" } else { "s" };
        notes.push(format!(
            "{}: {} file{s} not valid UTF-8, decoded with U+FFFD replacement characters (first: {first})",
            root.display(),
            lossy.len()
        ));
    }
    let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    let metrics = default_metrics(labels.len());
    let mut data = task_data(&name, Some(labels), train, dev, None, metrics, notes);
    apply_limits(&mut data, opts);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_two_classes_and_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("only")).unwrap();
        let err = load_folder(d.path(), &TaskOptions::default()).unwrap_err().to_string();
        assert!(
            err.ends_with("found 1 class folder(s); need at least 2 (one subfolder per label, one file per example)")
        );
        std::fs::create_dir(d.path().join("other")).unwrap();
        std::fs::write(d.path().join("other/a.txt"), "x").unwrap();
        let err = load_folder(d.path(), &TaskOptions::default()).unwrap_err().to_string();
        assert!(err.ends_with("only: no files: every class folder needs at least one example"), "{err}");
        let err = load_folder(&d.path().join("missing"), &TaskOptions::default()).unwrap_err().to_string();
        assert!(err.ends_with("missing: data folder not found"), "{err}");
    }
}
