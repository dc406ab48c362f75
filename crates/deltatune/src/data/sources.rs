//! [`DataSource`]: where a job's examples come from — a named benchmark task, the demo set, a
//! folder per class, or the user's files — recorded in run files so that eval can find them again.

use super::readers::{load_folder, load_task, load_user, Columns, Format, UserOptions};
use super::task::{TaskData, TaskOptions};
use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a run's examples come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum DataSource {
    /// A named benchmark task under a data root (e.g. `../shared/data`).
    Task { name: String, root: PathBuf },
    /// The BBC News demo set, fetched into the asset cache.
    Demo,
    /// One folder per class, one file per example.
    Folder { path: PathBuf },
    /// User CSV / TSV / JSONL files.
    User { train: PathBuf, dev: Option<PathBuf>, columns: Columns, format: Option<Format>, regression: bool },
}

impl DataSource {
    pub fn load(&self, opts: &TaskOptions, progress: &mut dyn FnMut(&str)) -> Result<TaskData> {
        match self {
            DataSource::Task { name, root } => load_task(name, root, opts),
            DataSource::Demo => {
                let dir = crate::assets::demo_data(progress)?;
                let mut t = load_folder(&dir, opts)?;
                t.name = "bbc-news".into();
                Ok(t)
            }
            DataSource::Folder { path } => load_folder(path, opts),
            DataSource::User { train, dev, columns, format, regression } => {
                let uo = UserOptions { split: opts.clone(), format: *format, header: None, regression: *regression, labels: None };
                load_user(train, dev.as_deref(), columns, &uo)
            }
        }
    }

    /// The files and folders this source reads (for the rule that an input is never an output).
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            DataSource::Task { root, .. } => vec![root.as_path()],
            DataSource::Demo => Vec::new(),
            DataSource::Folder { path } => vec![path.as_path()],
            DataSource::User { train, dev, .. } => std::iter::once(train.as_path()).chain(dev.as_deref()).collect(),
        }
    }

    /// A short name for run directories and summaries.
    pub fn label(&self) -> String {
        let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
        match self {
            DataSource::Task { name, .. } => name.clone(),
            DataSource::Demo => "bbc-news".into(),
            DataSource::Folder { path } => stem(path),
            DataSource::User { train, .. } => stem(train),
        }
    }
}

