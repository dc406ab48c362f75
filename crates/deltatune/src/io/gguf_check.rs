//! A bounds-checked walk over a GGUF header before candle's reader sees it. candle trusts the
//! lengths it reads (a string or array length of 2^60 becomes an allocation that aborts the
//! process, a tensor shape whose product overflows panics); here every length is checked against
//! the bytes left in the file, so a corrupt or hostile header is an error naming what is wrong.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// GGML's limit on tensor dimensions.
const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused.
const MAX_DEPTH: usize = 4;

struct Walker<'a, R: Read> {
    r: R,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read> Walker<'_, R> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Gguf { file: self.path.to_path_buf(), msg: format!("corrupt header at byte {}: {msg}", self.pos) }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| self.err(format!("the file ends inside {what}")))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Skips `n` bytes that must lie inside the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.left() {
            return Err(self.err(format!("{what} claims {n} bytes but only {} remain", self.left())));
        }
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink()).map_err(|e| self.err(e))?;
        if copied != n {
            return Err(self.err(format!("the file ends inside {what}")));
        }
        self.pos += n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<()> {
        let n = self.u64(what)?;
        self.skip(n, what)
    }

    /// Size of a fixed-size value type, or `None` for strings and arrays.
    fn fixed_size(t: u32) -> Option<u64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, t: u32, key: &str, depth: usize) -> Result<()> {
        if let Some(size) = Self::fixed_size(t) {
            return self.skip(size, key);
        }
        match t {
            8 => self.string(key),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(format!("`{key}`: arrays nested deeper than {MAX_DEPTH}")));
                }
                let et = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte (strings at least their 8-byte length).
                let min = Self::fixed_size(et).unwrap_or(8);
                if n.checked_mul(min).is_none_or(|b| b > self.left()) {
                    return Err(self.err(format!("`{key}`: an array of {n} elements cannot fit in the {} bytes left", self.left())));
                }
                match Self::fixed_size(et) {
                    Some(size) => self.skip(n * size, key),
                    None => (0..n).try_for_each(|_| self.value(et, key, depth + 1)),
                }
            }
            other => Err(self.err(format!("`{key}`: unknown value type {other}"))),
        }
    }
}

/// Walks the header of the GGUF file at `path` (`len` bytes, read from `r` positioned at the
/// start) and checks every count, length and shape against the file.
pub fn check_header(path: &Path, r: impl Read, len: u64) -> Result<()> {
    let mut w = Walker { r, pos: 0, len, path };
    let _magic = w.bytes::<4>("the magic")?;
    let _version = w.u32("the version")?;
    let tensors = w.u64("the tensor count")?;
    let kvs = w.u64("the metadata count")?;
    // A tensor entry takes at least 24 bytes, a metadata entry at least 13.
    if tensors.saturating_mul(24) > w.left() || kvs.saturating_mul(13) > w.left() {
        return Err(w.err(format!("{tensors} tensors and {kvs} metadata entries cannot fit in a {len}-byte file")));
    }
    for _ in 0..kvs {
        let key_len = w.u64("a metadata key")?;
        if key_len > w.left() {
            return Err(w.err(format!("a metadata key of {key_len} bytes does not fit")));
        }
        let mut key = vec![0u8; key_len as usize];
        w.r.read_exact(&mut key).map_err(|_| w.err("the file ends inside a metadata key"))?;
        w.pos += key_len;
        let key = String::from_utf8_lossy(&key).into_owned();
        let t = w.u32(&key)?;
        w.value(t, &key, 0)?;
    }
    for i in 0..tensors {
        let what = format!("tensor entry {i}");
        w.string(&what)?;
        let dims = w.u32(&what)?;
        if dims == 0 || dims > MAX_DIMS {
            return Err(w.err(format!("{what}: {dims} dimensions (1 to {MAX_DIMS} allowed)")));
        }
        // The product must fit whatever order a reader multiplies in: bound the non-zero dims.
        let mut elems: u64 = 1;
        for _ in 0..dims {
            let d = w.u64(&what)?.max(1);
            elems = elems.checked_mul(d).filter(|&e| e <= 1 << 48).ok_or_else(|| w.err(format!("{what}: its shape holds more elements than any model")))?;
        }
        let _dtype = w.u32(&what)?;
        let _offset = w.u64(&what)?;
    }
    Ok(())
}
