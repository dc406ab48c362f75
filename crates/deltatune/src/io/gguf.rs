//! GGUF files (llama.cpp's format): metadata and quantized tensors, read through candle's parser
//! with our own checks and error messages (file named, numbers given).
//!
//! Supported: GGUF versions 2 and 3; tensor types F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
//! the k-quants. Tensors are read as [`QTensor`]s and stay quantized.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use std::borrow::Cow;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// An open GGUF file: its metadata and tensor directory, read lazily.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("tensors", &self.content.tensor_infos.len()).finish()
    }
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory, and checks that every tensor's data lies
    /// inside the file (a truncated download is reported here, naming the first tensor cut off).
    pub fn open(path: &Path) -> Result<Self> {
        let gerr = |msg: String| Error::Gguf { file: path.to_path_buf(), msg };
        if !path.is_file() {
            return Err(Error::NotFound { path: path.to_path_buf(), what: "GGUF file".into() });
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 8];
        {
            use std::io::Read;
            let n = reader.read(&mut magic).map_err(|e| Error::io(path, e))?;
            if n < 8 || &magic[..4] != b"GGUF" {
                return Err(gerr("not a GGUF file (no `GGUF` magic at the start)".into()));
            }
            let version = u32::from_le_bytes([magic[4], magic[5], magic[6], magic[7]]);
            if !(2..=3).contains(&version) {
                return Err(gerr(format!("GGUF version {version} is not supported (versions 2 and 3 are)")));
            }
            use std::io::Seek;
            reader.seek(std::io::SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
            super::gguf_check::check_header(path, &mut reader, file_len)?;
            reader.seek(std::io::SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
        }
        let content = Content::read(&mut reader).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("dtype") {
                gerr(format!("unsupported tensor type: {msg} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K)"))
            } else {
                gerr(format!("cannot read the GGUF header: {msg}"))
            }
        })?;
        debug_assert!(matches!(content.magic, VersionedMagic::GgufV2 | VersionedMagic::GgufV3));
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &content.tensor_infos[name];
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(gerr(format!("tensor `{name}`: {elems} elements are not a whole number of {block}-element blocks")));
            }
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes);
            if end > file_len {
                return Err(gerr(format!(
                    "truncated: tensor `{name}` needs bytes up to {end}, the file has {file_len} (download it again)"
                )));
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), content, reader })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata value `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// All metadata (key → value), for copying a file's metadata into a new one.
    pub fn metadata(&self) -> &std::collections::HashMap<String, Value> {
        &self.content.metadata
    }

    fn missing(&self, key: &str) -> Error {
        Error::Gguf { file: self.path.clone(), msg: format!("metadata key `{key}` is missing") }
    }

    fn wrong(&self, key: &str, what: &str) -> Error {
        Error::Gguf { file: self.path.clone(), msg: format!("metadata key `{key}` is not {what}") }
    }

    /// A required string value.
    pub fn string(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(v) => v.to_string().map(|s| s.as_str()).map_err(|_| self.wrong(key, "a string")),
            None => Err(self.missing(key)),
        }
    }

    /// A required non-negative integer value (any integer type).
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        let n = match v {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            _ => return Err(self.wrong(key, "an integer")),
        };
        usize::try_from(n).map_err(|_| self.wrong(key, "a non-negative integer"))
    }

    /// An optional float value (f32 or f64).
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(self.wrong(key, "a float")),
        }
    }

    /// A required array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        let arr = v.to_vec().map_err(|_| self.wrong(key, "an array"))?;
        arr.iter().map(|x| x.to_string().map(|s| s.as_str()).map_err(|_| self.wrong(key, "an array of strings"))).collect()
    }

    /// An optional array of integers.
    pub fn ints_opt(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let arr = v.to_vec().map_err(|_| self.wrong(key, "an array"))?;
        arr.iter()
            .map(|x| match x {
                Value::I32(i) => Ok(*i as i64),
                Value::U32(i) => Ok(*i as i64),
                Value::I64(i) => Ok(*i),
                Value::U8(i) => Ok(*i as i64),
                Value::I8(i) => Ok(*i as i64),
                _ => Err(self.wrong(key, "an array of integers")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An optional array of floats.
    pub fn floats_opt(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let arr = v.to_vec().map_err(|_| self.wrong(key, "an array"))?;
        arr.iter()
            .map(|x| match x {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                _ => Err(self.wrong(key, "an array of floats")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An optional boolean value.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong(key, "a boolean")),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.content.tensor_infos.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    /// Shape (rows first, as in PyTorch) and type of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<(Vec<usize>, GgmlDType)> {
        self.content.tensor_infos.get(name).map(|i| (i.shape.dims().to_vec(), i.ggml_dtype))
    }

    /// Reads tensor `name`, checking its shape (rows first).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let Some((dims, _)) = self.tensor_info(name) else {
            return Err(Error::MissingTensor { file: self.path.clone(), key: name.into() });
        };
        if dims != shape {
            return Err(Error::ShapeMismatch { file: self.path.clone(), key: name.into(), expected: shape.to_vec(), got: dims });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::Gguf { file: self.path.clone(), msg: format!("tensor `{name}`: {e}") })
    }
}

/// Reorders the rows of a 2-D quantized tensor: row `i` of the result is row `order[i]` of `q`.
/// Quantization blocks run along rows, so this moves whole blocks and loses nothing.
pub fn permute_rows(q: &QTensor, order: &[usize]) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    if order.len() != rows {
        return Err(Error::Delta(format!("row permutation of length {} for {rows} rows", order.len())));
    }
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(data.len());
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// The row order that undoes llama.cpp's rotary interleaving of a query/key projection with
/// `heads` heads: GGUF stores, within each head, the rows of the two rotary halves interleaved
/// (`[a0, b0, a1, b1, ...]`), HF keeps them as two halves (`[a0, a1, ..., b0, b1, ...]`).
pub fn unpermute_rotary_order(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    let half = d / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * d + i * 2 + j);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_order_is_a_permutation_that_splits_halves() {
        let o = unpermute_rotary_order(8, 2);
        assert_eq!(o, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        let mut s = unpermute_rotary_order(576, 9);
        s.sort();
        assert_eq!(s, (0..576).collect::<Vec<_>>());
    }
}
