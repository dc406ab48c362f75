//! Reading text one example per line, strictly: a line that is not valid UTF-8 is an error naming
//! the file (or `<stdin>`) and the line number.

use crate::error::{Error, Result};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// Splits `bytes` into lines (`\n` or `\r\n`), decoding each as UTF-8.
pub fn split_lines(bytes: &[u8], origin: &Path) -> Result<Vec<String>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, raw)| {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            std::str::from_utf8(raw).map(str::to_string).map_err(|e| Error::Text {
                file: origin.to_path_buf(),
                line: i + 1,
                msg: format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1),
            })
        })
        .collect()
}

/// Reads all lines of `path`, or of standard input when `None`.
pub fn read_lines(path: Option<&Path>) -> Result<Vec<String>> {
    match path {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound { path: p.to_path_buf(), what: "input file".into() },
                _ => Error::io(p, e),
            })?;
            split_lines(&bytes, p)
        }
        None => {
            let mut bytes = Vec::new();
            std::io::stdin().lock().read_to_end(&mut bytes).map_err(|e| Error::io("<stdin>", e))?;
            split_lines(&bytes, &PathBuf::from("<stdin>"))
        }
    }
}

/// Reads lines lossily (invalid UTF-8 replaced by U+FFFD); returns the lines and the numbers
/// (1-based) of the lines that needed replacement.
pub fn read_lines_lossy(reader: impl BufRead) -> std::io::Result<(Vec<String>, Vec<usize>)> {
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for (i, raw) in reader.split(b'\n').enumerate() {
        let raw = raw?;
        let raw = raw.strip_suffix(b"\r").unwrap_or(&raw);
        match std::str::from_utf8(raw) {
            Ok(s) => lines.push(s.to_string()),
            Err(_) => {
                bad.push(i + 1);
                lines.push(String::from_utf8_lossy(raw).into_owned());
            }
        }
    }
    Ok((lines, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_errors() {
        let p = Path::new("in.txt");
        assert_eq!(split_lines(b"a\nb\r\nc\n", p).unwrap(), vec!["a", "b", "c"]);
        assert_eq!(split_lines(b"a\n\nc", p).unwrap(), vec!["a", "", "c"]);
        assert!(split_lines(b"", p).unwrap().is_empty());
        let err = split_lines(b"ok\nbad \xff here\n", p).unwrap_err();
        assert_eq!(err.to_string(), "in.txt:2: not valid UTF-8 (byte 5 of the line)");
    }
}
