//! What every reader shares: reading and decoding files into numbered lines, turning raw label
//! strings into [`Label`]s with errors that point at the file, line and column, seeded held-out
//! splits, and the train/dev limits. Format-specific parsing lives in the sibling files.

use crate::data::lines::{read_lines_lossy, split_lines};
use crate::data::rng::{permutation, stream, SplitMix64};
use crate::data::task::{Example, Label, LabelMap, TaskData, TaskOptions};
use crate::error::{Error, Result};
use std::path::Path;

/// How a file's bytes become text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decoding {
    /// Strict UTF-8: a bad byte is an error naming the line (benchmark files known to be UTF-8).
    Utf8,
    /// Latin-1: every byte is the code point of the same value (old benchmark files).
    Latin1,
    /// UTF-8, invalid sequences replaced by U+FFFD and counted (user files).
    Lossy,
}

/// A decoded file: `(line number, text)` for every line, and the lines that needed replacement.
#[derive(Debug)]
pub(crate) struct Lines {
    pub lines: Vec<(usize, String)>,
    pub lossy: Vec<usize>,
}

pub(crate) fn read_bytes(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { path: path.to_path_buf(), what: what.to_string() },
        _ => Error::io(path, e),
    })
}

/// Splits `bytes` into lines (`\n` or `\r\n`; a missing final newline is fine) and decodes them.
/// A UTF-8 byte-order mark at the start of the file is dropped.
pub(crate) fn decode_lines(bytes: &[u8], path: &Path, decoding: Decoding) -> Result<Lines> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let (texts, lossy) = match decoding {
        Decoding::Utf8 => (split_lines(bytes, path)?, Vec::new()),
        Decoding::Lossy => read_lines_lossy(bytes).map_err(|e| Error::io(path, e))?,
        Decoding::Latin1 => {
            let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            let texts = if bytes.is_empty() {
                Vec::new()
            } else {
                body.split(|&b| b == b'\n')
                    .map(|l| l.strip_suffix(b"\r").unwrap_or(l).iter().map(|&b| char::from(b)).collect())
                    .collect()
            };
            (texts, Vec::new())
        }
    };
    Ok(Lines { lines: texts.into_iter().enumerate().map(|(i, t)| (i + 1, t)).collect(), lossy })
}

/// The one warning about lossy decoding of `file`, if any line needed it.
pub(crate) fn lossy_note(file: &Path, lossy: &[usize]) -> Option<String> {
    let first = lossy.first()?;
    let n = lossy.len();
    let s = if n == 1 { "" } else { "s" };
    Some(format!(
        "{}: {n} line{s} not valid UTF-8, decoded with U+FFFD replacement characters (first: line {first})",
        file.display()
    ))
}

/// One example before its label is interpreted. `label_col` is the 1-based field of the label
/// (for error messages), when the format has fields.
#[derive(Clone, Debug)]
pub(crate) struct RawExample {
    pub line: usize,
    pub label_col: Option<usize>,
    pub text_a: String,
    pub text_b: Option<String>,
    pub label: String,
}

/// Maps every raw label through `map`; an unknown label names its place and the known labels.
pub(crate) fn to_classes(raw: Vec<RawExample>, map: &LabelMap, file: &Path) -> Result<Vec<Example>> {
    raw.into_iter()
        .map(|r| match map.index(&r.label) {
            Some(c) => Ok(Example { text_a: r.text_a, text_b: r.text_b, label: Label::Class(c) }),
            None => Err(Error::data(
                file,
                r.line,
                r.label_col,
                format!("unknown label \"{}\"; known labels: {}", r.label, map.names().join(", ")),
            )),
        })
        .collect()
}

/// Parses every raw label as a finite number.
pub(crate) fn to_reals(raw: Vec<RawExample>, file: &Path) -> Result<Vec<Example>> {
    raw.into_iter()
        .map(|r| match r.label.parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(Example { text_a: r.text_a, text_b: r.text_b, label: Label::Real(v) }),
            _ => Err(Error::data(file, r.line, r.label_col, format!("cannot parse label \"{}\" as a number", r.label))),
        })
        .collect()
}

/// An error when a split came out empty.
pub(crate) fn require_examples<T>(items: &[T], file: &Path) -> Result<()> {
    if items.is_empty() {
        return Err(Error::data_file(file, "no examples"));
    }
    Ok(())
}

/// How many of `n` examples a fraction holds out: rounded, at least 1, leaving at least 1.
pub(crate) fn held_out_count(n: usize, fraction: f32) -> usize {
    let k = (n as f64 * f64::from(fraction)).round() as usize;
    k.clamp(1, n.saturating_sub(1).max(1))
}

/// Holds `n_held` seeded-random examples out of `examples`. Both parts keep file order, so that
/// "the first N" of either part is well defined.
pub(crate) fn split_off(
    examples: Vec<Example>,
    n_held: usize,
    seed: u64,
    file: &Path,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let n = examples.len();
    if n_held == 0 || n_held >= n {
        return Err(Error::data_file(
            file,
            format!("cannot hold out {n_held} of {n} examples for a dev split (need at least one left to train on)"),
        ));
    }
    let perm = permutation(n, &mut SplitMix64::derived(seed, &[stream::SPLIT]));
    let mut held_mask = vec![false; n];
    for &i in perm.iter().take(n_held) {
        held_mask[i] = true;
    }
    let (mut kept, mut held) = (Vec::with_capacity(n - n_held), Vec::with_capacity(n_held));
    for (e, is_held) in examples.into_iter().zip(held_mask) {
        if is_held {
            held.push(e);
        } else {
            kept.push(e);
        }
    }
    Ok((kept, held))
}

/// The examples in a seeded random order (for data that has no single file order: two-file and
/// folder-per-class data sets, which would otherwise be sorted by class).
pub(crate) fn shuffled(examples: Vec<Example>, seed: u64) -> Vec<Example> {
    let perm = permutation(examples.len(), &mut SplitMix64::derived(seed, &[stream::SPLIT]));
    let mut slots: Vec<Option<Example>> = examples.into_iter().map(Some).collect();
    perm.into_iter().filter_map(|i| slots.get_mut(i).and_then(Option::take)).collect()
}

/// Applies `max_train` / `max_dev` (first N in order) and records what was cut.
pub(crate) fn apply_limits(data: &mut TaskData, opts: &TaskOptions) {
    for (split, max, what) in [(&mut data.train, opts.max_train, "train"), (&mut data.dev, opts.max_dev, "dev")] {
        if let Some(max) = max.filter(|&m| m < split.len()) {
            data.notes.push(format!("{what}: first {} of {} examples kept", thousands(max), thousands(split.len())));
            split.truncate(max);
        }
    }
}

/// `67349` → `"67,349"`, for notes.
pub(crate) fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: usize) -> Example {
        Example { text_a: i.to_string(), text_b: None, label: Label::Class(i % 2) }
    }

    #[test]
    fn decodings() {
        let p = Path::new("f.txt");
        let l = decode_lines(b"\xEF\xBB\xBFa\r\nb\xe9\n\nc", p, Decoding::Latin1).unwrap();
        assert_eq!(l.lines, vec![(1, "a".into()), (2, "b\u{e9}".into()), (3, "".into()), (4, "c".into())]);
        let l = decode_lines(b"ok\nb\xffd\nx\xfe\n", p, Decoding::Lossy).unwrap();
        assert_eq!(l.lossy, vec![2, 3]);
        assert_eq!(l.lines[1].1, "b\u{fffd}d");
        assert_eq!(
            lossy_note(p, &l.lossy).unwrap(),
            "f.txt: 2 lines not valid UTF-8, decoded with U+FFFD replacement characters (first: line 2)"
        );
        let err = decode_lines(b"ok\nb\xffd\n", p, Decoding::Utf8).unwrap_err();
        assert_eq!(err.to_string(), "f.txt:2: not valid UTF-8 (byte 2 of the line)");
        assert!(decode_lines(b"", p, Decoding::Latin1).unwrap().lines.is_empty());
    }

    #[test]
    fn split_off_keeps_file_order_and_is_seeded() {
        let all: Vec<Example> = (0..20).map(ex).collect();
        let (kept, held) = split_off(all.clone(), 5, 42, Path::new("t")).unwrap();
        assert_eq!((kept.len(), held.len()), (15, 5));
        let idx = |v: &[Example]| v.iter().map(|e| e.text_a.parse::<usize>().unwrap()).collect::<Vec<_>>();
        let (k, h) = (idx(&kept), idx(&held));
        assert!(k.windows(2).all(|w| w[0] < w[1]) && h.windows(2).all(|w| w[0] < w[1]));
        let (kept2, held2) = split_off(all.clone(), 5, 42, Path::new("t")).unwrap();
        assert_eq!((kept2, held2), (kept, held.clone()));
        let (_, held3) = split_off(all.clone(), 5, 7, Path::new("t")).unwrap();
        assert_ne!(held3, held);
        let err = split_off(vec![ex(0)], 1, 42, Path::new("t")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "t: cannot hold out 1 of 1 examples for a dev split (need at least one left to train on)"
        );
    }

    #[test]
    fn counts_and_limits() {
        assert_eq!(held_out_count(5452, 0.1), 545);
        assert_eq!(held_out_count(3, 0.1), 1);
        assert_eq!(held_out_count(2, 0.9), 1);
        assert_eq!(thousands(67349), "67,349");
        assert_eq!(thousands(872), "872");
        assert_eq!(thousands(1_000_000), "1,000,000");
        let mut perm = shuffled((0..10).map(ex).collect(), 1);
        perm.sort_by_key(|e| e.text_a.parse::<usize>().unwrap());
        assert_eq!(perm, (0..10).map(ex).collect::<Vec<_>>());
    }
}
