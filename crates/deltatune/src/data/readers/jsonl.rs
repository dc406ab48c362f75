//! JSON Lines: one JSON object per line (SuperGLUE files, user `.jsonl`). Blank lines are skipped;
//! a syntax error names the line and the character column. Which keys mean what is up to the
//! caller (`superglue.rs`, `user.rs`).

use super::source::{decode_lines, read_bytes, Decoding, RawExample};
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub(crate) struct JsonRow {
    pub line: usize,
    pub obj: Map<String, Value>,
}

#[derive(Debug)]
pub(crate) struct JsonFile {
    pub file: PathBuf,
    pub rows: Vec<JsonRow>,
    /// Lines that were not valid UTF-8 (lossy decoding only).
    pub lossy: Vec<usize>,
}

pub(crate) fn read_jsonl(path: &Path, decoding: Decoding) -> Result<JsonFile> {
    let bytes = read_bytes(path, "data file")?;
    let decoded = decode_lines(&bytes, path, decoding)?;
    let mut rows = Vec::new();
    for (line, text) in decoded.lines {
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            // serde_json appends " at line L column C"; the line is always 1 here, so say it ourselves.
            let msg = e.to_string();
            let msg = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]).to_string();
            Error::data(path, line, Some(e.column()), format!("invalid JSON: {msg}"))
        })?;
        match value {
            Value::Object(obj) => rows.push(JsonRow { line, obj }),
            other => {
                return Err(Error::data(path, line, None, format!("expected a JSON object, found {}", kind(&other))))
            }
        }
    }
    Ok(JsonFile { file: path.to_path_buf(), rows, lossy: decoded.lossy })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl JsonFile {
    fn get<'a>(&self, row: &'a JsonRow, key: &str) -> Result<&'a Value> {
        row.obj.get(key).ok_or_else(|| {
            let keys: Vec<&str> = row.obj.keys().map(String::as_str).collect();
            Error::data(&self.file, row.line, None, format!("missing key `{key}`; keys present: {}", keys.join(", ")))
        })
    }

    /// A text field: must be a string.
    pub fn text(&self, row: &JsonRow, key: &str) -> Result<String> {
        match self.get(row, key)? {
            Value::String(s) => Ok(s.trim().to_string()),
            other => Err(Error::data(
                &self.file,
                row.line,
                None,
                format!("key `{key}` should be a string, found {}", kind(other)),
            )),
        }
    }

    /// A label field as a string: strings as they are, booleans as `true`/`false`, numbers in
    /// their JSON spelling (`1`, `0.5`).
    pub fn label(&self, row: &JsonRow, key: &str) -> Result<String> {
        match self.get(row, key)? {
            Value::String(s) => Ok(s.trim().to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(Error::data(
                &self.file,
                row.line,
                None,
                format!("key `{key}` should be a string, number or boolean label, found {}", kind(other)),
            )),
        }
    }

    pub fn raw_examples(&self, text_a: &str, text_b: Option<&str>, label: &str) -> Result<Vec<RawExample>> {
        self.rows
            .iter()
            .map(|r| {
                Ok(RawExample {
                    line: r.line,
                    label_col: None,
                    text_a: self.text(r, text_a)?,
                    text_b: text_b.map(|b| self.text(r, b)).transpose()?,
                    label: self.label(r, label)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_labels_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        std::fs::write(&p, "{\"t\": \" x \", \"l\": true}\n\n{\"t\": \"y\", \"l\": 2}\n{\"t\": \"z\", \"l\": \"neg\"}")
            .unwrap();
        let f = read_jsonl(&p, Decoding::Utf8).unwrap();
        let raw = f.raw_examples("t", None, "l").unwrap();
        let got: Vec<(usize, &str, &str)> = raw.iter().map(|r| (r.line, r.text_a.as_str(), r.label.as_str())).collect();
        assert_eq!(got, vec![(1, "x", "true"), (3, "y", "2"), (4, "z", "neg")]);
        let err = f.raw_examples("text", None, "l").unwrap_err().to_string();
        assert!(err.ends_with("a.jsonl:1: missing key `text`; keys present: t, l"), "{err}");
        let err = f.raw_examples("l", None, "t").unwrap_err().to_string();
        assert!(err.ends_with("a.jsonl:1: key `l` should be a string, found a boolean"), "{err}");

        std::fs::write(&p, "{\"t\": \"x\"}\n{\"t\": \"y\",}\n").unwrap();
        let err = read_jsonl(&p, Decoding::Utf8).unwrap_err().to_string();
        assert!(err.ends_with("a.jsonl:2:11: invalid JSON: trailing comma"), "{err}");
        std::fs::write(&p, "[1]\n").unwrap();
        let err = read_jsonl(&p, Decoding::Utf8).unwrap_err().to_string();
        assert!(err.ends_with("a.jsonl:1: expected a JSON object, found an array"), "{err}");
    }
}
