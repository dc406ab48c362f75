//! Delimited text tables: TSV (split on tabs, no quote handling — GLUE files contain unbalanced
//! `"`) and CSV (RFC 4180 quotes, via the `csv` crate). Both give a [`Table`] of rows with line
//! numbers, checked for a consistent field count, and columns picked by header name or 0-based index.
//! What the columns mean is up to the caller (`glue.rs`, `user.rs`).

use super::source::{decode_lines, read_bytes, Decoding, RawExample};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// One data row and the (1-based) line it starts on.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub line: usize,
    pub fields: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct Table {
    pub file: PathBuf,
    pub header: Option<Vec<String>>,
    /// Line of the header, or of the first row when there is none (for column errors).
    pub first_line: usize,
    pub rows: Vec<Row>,
    /// Lines that were not valid UTF-8 (lossy decoding only).
    pub lossy: Vec<usize>,
}

/// Reads a tab-separated file. Blank lines are skipped; every row must have as many fields as the
/// header (or, without a header, as the first row).
pub(crate) fn read_tsv(path: &Path, decoding: Decoding, header: bool) -> Result<Table> {
    let bytes = read_bytes(path, "data file")?;
    let decoded = decode_lines(&bytes, path, decoding)?;
    let records = decoded
        .lines
        .into_iter()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(line, l)| Row { line, fields: l.split('\t').map(str::to_string).collect() })
        .collect();
    build(path, records, header, decoded.lossy, "tab-separated")
}

/// Reads a comma-separated file with quotes. Invalid UTF-8 is replaced (lossy) and counted.
pub(crate) fn read_csv(path: &Path, header: bool) -> Result<Table> {
    let bytes = read_bytes(path, "data file")?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(bytes);
    let mut rows = Vec::new();
    let mut lossy = Vec::new();
    for rec in reader.byte_records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            Error::data(path, line, None, format!("cannot parse CSV: {e}"))
        })?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        let mut bad = false;
        let fields = rec
            .iter()
            .map(|f| match std::str::from_utf8(f) {
                Ok(s) => s.to_string(),
                Err(_) => {
                    bad = true;
                    String::from_utf8_lossy(f).into_owned()
                }
            })
            .collect();
        if bad {
            lossy.push(line);
        }
        rows.push(Row { line, fields });
    }
    build(path, rows, header, lossy, "comma-separated")
}

fn build(path: &Path, records: Vec<Row>, header: bool, lossy: Vec<usize>, sep: &str) -> Result<Table> {
    let empty = || Error::data_file(path, "no examples (the file is empty)");
    let mut records = records.into_iter();
    let (header, first_line, width, source) = if header {
        let h = records.next().ok_or_else(empty)?;
        let cells = h.fields.iter().map(|f| f.trim().to_string()).collect();
        (Some(cells), h.line, h.fields.len(), "the header".to_string())
    } else {
        let first = records.as_slice().first().ok_or_else(empty)?;
        (None, first.line, first.fields.len(), format!("line {}", first.line))
    };
    let mut rows = Vec::with_capacity(records.len());
    for r in records {
        if r.fields.len() != width {
            return Err(Error::data(
                path,
                r.line,
                None,
                format!("expected {width} {sep} fields (as in {source}), found {}", r.fields.len()),
            ));
        }
        rows.push(r);
    }
    Ok(Table { file: path.to_path_buf(), header, first_line, rows, lossy })
}

impl Table {
    /// The 0-based index of a column: a header cell equal to `spec`, else `spec` read as a 0-based
    /// index (the only way to name a column of a file without a header).
    pub fn column(&self, spec: &str) -> Result<usize> {
        if let Some(i) = self.header.as_ref().and_then(|h| h.iter().position(|c| c == spec)) {
            return Ok(i);
        }
        let width = self.header.as_ref().map(Vec::len).or_else(|| self.rows.first().map(|r| r.fields.len()));
        let width = width.unwrap_or(0);
        let err = |msg: String| Error::data(&self.file, self.first_line, None, msg);
        match (spec.trim().parse::<usize>(), &self.header) {
            (Ok(i), _) if i < width => Ok(i),
            (Ok(i), _) => Err(err(format!(
                "column index {i} is out of range: rows have {width} fields (indices 0..={})",
                width.saturating_sub(1)
            ))),
            (Err(_), Some(h)) => Err(err(format!("no column `{spec}`; available columns: {}", h.join(", ")))),
            (Err(_), None) => Err(err(format!(
                "no header row, so columns are 0-based indices (0..={}); got `{spec}`",
                width.saturating_sub(1)
            ))),
        }
    }

    /// Rows as raw examples: texts trimmed, label trimmed, `label_col` 1-based for messages.
    pub fn raw_examples(&self, text_a: usize, text_b: Option<usize>, label: usize) -> Vec<RawExample> {
        let field = |r: &Row, i: usize| r.fields.get(i).map(|s| s.trim().to_string()).unwrap_or_default();
        self.rows
            .iter()
            .map(|r| RawExample {
                line: r.line,
                label_col: Some(label + 1),
                text_a: field(r, text_a),
                text_b: text_b.map(|b| field(r, b)),
                label: field(r, label),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn tsv_with_header_and_quotes_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.tsv", b"sentence\tlabel\n \"unbalanced quote \t1\n\nplain\t0\n");
        let t = read_tsv(&p, Decoding::Utf8, true).unwrap();
        assert_eq!(t.header.as_deref(), Some(&["sentence".to_string(), "label".to_string()][..]));
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[1].line, 4);
        let raw = t.raw_examples(t.column("sentence").unwrap(), None, t.column("label").unwrap());
        assert_eq!(raw[0].text_a, "\"unbalanced quote");
        assert_eq!((raw[1].label.as_str(), raw[1].label_col), ("0", Some(2)));
        let err = t.column("text").unwrap_err().to_string();
        assert!(err.ends_with("a.tsv:1: no column `text`; available columns: sentence, label"), "{err}");
        assert_eq!(t.column("1").unwrap(), 1);
    }

    #[test]
    fn tsv_field_count_and_headerless_columns() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "b.tsv", b"x\t1\ty\n\nz\t0\n");
        let err = read_tsv(&p, Decoding::Utf8, false).unwrap_err().to_string();
        assert!(err.ends_with("b.tsv:3: expected 3 tab-separated fields (as in line 1), found 2"), "{err}");
        let p = write(d.path(), "c.tsv", b"x\t1\nz\t0");
        let t = read_tsv(&p, Decoding::Utf8, false).unwrap();
        assert_eq!(t.column("1").unwrap(), 1);
        let err = t.column("2").unwrap_err().to_string();
        assert!(err.ends_with("c.tsv:1: column index 2 is out of range: rows have 2 fields (indices 0..=1)"), "{err}");
        let err = t.column("label").unwrap_err().to_string();
        assert!(err.ends_with("no header row, so columns are 0-based indices (0..=1); got `label`"), "{err}");
    }

    #[test]
    fn csv_quotes_multiline_and_lossy() {
        let d = tempfile::tempdir().unwrap();
        let body = b"\xEF\xBB\xBFtext,label\n\"a, b\",1\n\"multi\nline\",0\nbad \xff,1\n";
        let p = write(d.path(), "d.csv", body);
        let t = read_csv(&p, true).unwrap();
        assert_eq!(t.header.as_ref().unwrap()[0], "text");
        let lines: Vec<usize> = t.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![2, 3, 5]);
        assert_eq!(t.rows[1].fields[0], "multi\nline");
        assert_eq!(t.lossy, vec![5]);
        let p = write(d.path(), "e.csv", b"text,label\na,1,extra\n");
        let err = read_csv(&p, true).unwrap_err().to_string();
        assert!(err.ends_with("e.csv:2: expected 2 comma-separated fields (as in the header), found 3"), "{err}");
        let p = write(d.path(), "f.csv", b"");
        let err = read_csv(&p, true).unwrap_err().to_string();
        assert!(err.ends_with("f.csv: no examples (the file is empty)"), "{err}");
    }
}
