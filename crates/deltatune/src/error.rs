//! The crate's one error type. Every variant names the file, tensor, key, pattern or flag the user
//! has to fix; candle errors are wrapped with whatever context the caller has.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed: what was being done (`reading`, `writing`, …), on which path,
    /// and the system's reason. The reason is part of the message, not a separate cause, so a
    /// chain prints it once.
    #[error("{op}{}{}: {err}", if op.is_empty() { "" } else { " " }, path.display())]
    Io { path: PathBuf, op: &'static str, err: std::io::Error },

    #[error("{}: {what} not found", path.display())]
    NotFound { path: PathBuf, what: String },

    #[error("{}: invalid JSON: {msg}", file.display())]
    Json { file: PathBuf, msg: String },

    #[error("{}: missing field `{field}`", file.display())]
    MissingField { file: PathBuf, field: String },

    #[error("{}: {msg}", file.display())]
    Config { file: PathBuf, msg: String },

    #[error("{}: not a valid safetensors file: {msg}", file.display())]
    Safetensors { file: PathBuf, msg: String },

    /// A GGUF file that cannot be used (version, tensor type, truncation, metadata).
    #[error("{}: {msg}", file.display())]
    Gguf { file: PathBuf, msg: String },

    #[error("{}: tensor `{key}` is missing", file.display())]
    MissingTensor { file: PathBuf, key: String },

    #[error("{}: tensor `{key}` has shape {got:?}, expected {expected:?}", file.display())]
    ShapeMismatch { file: PathBuf, key: String, expected: Vec<usize>, got: Vec<usize> },

    #[error("{}: tensor `{key}` has dtype {got}, expected {expected}", file.display())]
    DtypeMismatch { file: PathBuf, key: String, expected: String, got: String },

    #[error("{}: tokenizer error: {msg}", file.display())]
    Tokenizer { file: PathBuf, msg: String },

    #[error("{}:{line}: {msg}", file.display())]
    Text { file: PathBuf, line: usize, msg: String },

    /// A problem at one place of a data file. `line` is 1-based (a header counts as line 1); `col`
    /// is the 1-based field number in CSV/TSV rows, or the character column of a JSON syntax error.
    #[error("{}:{line}{}: {msg}", file.display(), col.map(|c| format!(":{c}")).unwrap_or_default())]
    Data { file: PathBuf, line: usize, col: Option<usize>, msg: String },

    /// A problem with a data file or folder as a whole: an empty split, a split that is missing.
    #[error("{}: {msg}", file.display())]
    DataFile { file: PathBuf, msg: String },

    /// Predictions and gold labels that a metric cannot be computed on.
    #[error("metric {metric}: {msg}")]
    Metric { metric: String, msg: String },

    /// Fetching the default assets failed; `msg` says what to install or which flag to use instead.
    #[error("{0}")]
    Asset(String),

    /// A flag or argument value that cannot be used.
    #[error("invalid {flag}: {msg}")]
    InvalidArg { flag: String, msg: String },

    /// A delta method or configuration problem.
    #[error("{0}")]
    Delta(String),

    /// A name pattern that matched no module of the tree.
    #[error("pattern `{pattern}` matches no module{hint}")]
    NoMatch { pattern: String, hint: String },

    /// Loss, gradient or merged weights stopped being finite numbers.
    #[error("non-finite value: {0}")]
    NonFinite(String),

    /// The caller asked the job to stop (a cancellation flag checked between steps).
    #[error("cancelled{}", if .0.is_empty() { String::new() } else { format!(": {}", .0) })]
    Cancelled(String),

    /// Data-parallel training: another process failed, or the processes disagree.
    #[error("data-parallel: {0}")]
    Distributed(String),

    /// An error every rank of a data-parallel job knows about (they agreed on it), so every rank
    /// stops on its own and none needs to end the others.
    #[error(transparent)]
    AllRanksStopped(Box<Error>),

    #[error("{context}: {err}")]
    Candle { context: String, err: candle_core::Error },

    #[error(transparent)]
    CandleRaw(#[from] candle_core::Error),
}

impl Error {
    /// An I/O error on `path`; prefer [`Error::io_op`], which also says what was being done.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), op: "", err }
    }
    /// An I/O error while doing `op` (`reading`, `creating`, …) on `path`.
    pub fn io_op(path: impl Into<PathBuf>, op: &'static str, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), op, err }
    }
    pub fn arg(flag: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArg { flag: flag.into(), msg: msg.into() }
    }
    pub fn data(file: impl Into<PathBuf>, line: usize, col: Option<usize>, msg: impl Into<String>) -> Self {
        Error::Data { file: file.into(), line, col, msg: msg.into() }
    }
    pub fn data_file(file: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::DataFile { file: file.into(), msg: msg.into() }
    }
}

/// Adds context to candle errors (`.ctx("loading layer 3")`).
pub trait ResultExt<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> ResultExt<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| Error::Candle { context: context(), err })
    }
}

// Suggestions for misspelt names, used by the messages of every layer.

pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j + 1] + 1).min(cur[j] + 1).min(prev[j] + usize::from(ca != *cb)));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// ` (did you mean `x`?)` for the nearest candidate within a small edit distance, else "".
pub fn suggest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    let best = candidates.map(|c| (levenshtein(word, c), c)).min();
    match best {
        Some((d, c)) if d <= 2.max(word.len() / 3) => format!(" (did you mean `{c}`?)"),
        _ => String::new(),
    }
}

/// Candidates ranked by edit distance (nearest first), for "nearest valid paths" hints.
pub fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>, n: usize) -> Vec<&'a str> {
    let mut scored: Vec<(usize, &str)> = candidates.map(|c| (levenshtein(word, c), c)).collect();
    scored.sort();
    scored.into_iter().map(|(_, c)| c).take(n).collect()
}


/// Range checks of user-given numbers; each error names the flag or field at fault.
pub mod check {
    use super::{Error, Result};

    /// A finite number above zero.
    pub fn positive(flag: &str, v: f64) -> Result<()> {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(Error::arg(flag, format!("{v} (expected a positive number)")))
        }
    }

    /// A finite number, zero or above.
    pub fn non_negative(flag: &str, v: f64) -> Result<()> {
        if v.is_finite() && v >= 0.0 {
            Ok(())
        } else {
            Err(Error::arg(flag, format!("{v} (expected a number ≥ 0)")))
        }
    }

    /// A finite number in [lo, hi) (or [lo, hi] with `closed`).
    pub fn in_range(flag: &str, v: f64, lo: f64, hi: f64, closed: bool) -> Result<()> {
        let ok = v.is_finite() && v >= lo && (v < hi || (closed && v == hi));
        if ok {
            Ok(())
        } else {
            Err(Error::arg(flag, format!("{v} (expected a value in [{lo}, {hi}{})", if closed { "]" } else { ")" })))
        }
    }

    /// A count of at least `min`.
    pub fn at_least(flag: &str, v: usize, min: usize) -> Result<()> {
        if v >= min {
            Ok(())
        } else {
            Err(Error::arg(flag, format!("{v} (must be at least {min})")))
        }
    }

    /// A count of at most `max` (`why` says where the limit comes from).
    pub fn at_most(flag: &str, v: usize, max: usize, why: &str) -> Result<()> {
        if v <= max {
            Ok(())
        } else {
            Err(Error::arg(flag, format!("{v} exceeds {max} ({why})")))
        }
    }
}
