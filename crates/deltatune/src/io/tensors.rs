//! Reading and writing safetensors with errors that name the file and the tensor.
//!
//! [`TensorFile`] loads every tensor of a file into memory (validating the header first, so a
//! truncated or corrupt file is reported, not panicked on) and hands them out by name with shape and
//! dtype checks.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// All tensors of one safetensors file, by name.
#[derive(Debug)]
pub struct TensorFile {
    pub path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    /// Float tensors holding NaN or infinity; refused when asked for as numbers.
    non_finite: std::collections::BTreeSet<String>,
    pub metadata: BTreeMap<String, String>,
}

fn convert_dtype(dt: StDtype) -> Option<DType> {
    Some(match dt {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::U32 => DType::U32,
        StDtype::U8 => DType::U8,
        _ => return None,
    })
}

impl TensorFile {
    /// Reads and validates `path`. Tensors of dtypes deltatune does not use are skipped unless a
    /// caller asks for them (then [`TensorFile::get`] reports them as missing with the dtype).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::NotFound { path: path.to_path_buf(), what: "safetensors file".into() }
            }
            _ => Error::io_op(path, "reading", e),
        })?;
        Self::from_bytes(path, &bytes, device)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8], device: &Device) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
            file: path.to_path_buf(),
            msg: describe_st_error(&e, bytes.len()),
        })?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
            file: path.to_path_buf(),
            msg: describe_st_error(&e, bytes.len()),
        })?;
        let metadata: BTreeMap<String, String> =
            header.metadata().clone().unwrap_or_default().into_iter().collect();
        let mut tensors = BTreeMap::new();
        let mut non_finite = std::collections::BTreeSet::new();
        for (name, view) in st.tensors() {
            let Some(dtype) = convert_dtype(view.dtype()) else { continue };
            if !all_finite(view.dtype(), view.data()) {
                non_finite.insert(name.clone());
            }
            let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
                .map_err(|e| Error::Safetensors {
                    file: path.to_path_buf(),
                    msg: format!("tensor `{name}`: {e}"),
                })?;
            tensors.insert(name, t);
        }
        Ok(Self { path: path.to_path_buf(), tensors, non_finite, metadata })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor `name`, or an error naming the file and the tensor (also for NaN or infinite
    /// values).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        if self.non_finite.contains(name) {
            return Err(self.non_finite_error(name));
        }
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { file: self.path.clone(), key: name.to_string() })
    }

    /// Refuses a file holding any non-finite float, naming the first such tensor.
    pub fn check_finite(&self) -> Result<()> {
        match self.non_finite.iter().next() {
            Some(name) => Err(self.non_finite_error(name)),
            None => Ok(()),
        }
    }

    fn non_finite_error(&self, name: &str) -> Error {
        Error::NonFinite(format!("{}: tensor `{name}` holds NaN or infinite values; the file cannot be used", self.path.display()))
    }

    /// The tensor `name` as f32 with exactly `shape`; NaN or infinite values are refused.
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.non_finite.contains(name) {
            return Err(self.non_finite_error(name));
        }
        let t = self.get(name)?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                file: self.path.clone(),
                key: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        match t.dtype() {
            DType::F32 => Ok(t.clone()),
            DType::F16 | DType::BF16 | DType::F64 => Ok(t.to_dtype(DType::F32)?),
            other => Err(Error::DtypeMismatch {
                file: self.path.clone(),
                key: name.to_string(),
                expected: "a float dtype".into(),
                got: format!("{other:?}"),
            }),
        }
    }

    /// Removes and returns all tensors (for callers that take ownership).
    pub fn into_map(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }
}

/// Whether every value of a little-endian float buffer is finite (integer dtypes always are).
/// Checks the exponent bits directly: all ones means infinity or NaN.
fn all_finite(dtype: StDtype, data: &[u8]) -> bool {
    match dtype {
        StDtype::F32 => data.chunks_exact(4).all(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) >> 23) & 0xff != 0xff),
        StDtype::F64 => data.chunks_exact(8).all(|c| (u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) >> 52) & 0x7ff != 0x7ff),
        StDtype::F16 => data.chunks_exact(2).all(|c| (u16::from_le_bytes([c[0], c[1]]) >> 10) & 0x1f != 0x1f),
        StDtype::BF16 => data.chunks_exact(2).all(|c| (u16::from_le_bytes([c[0], c[1]]) >> 7) & 0xff != 0xff),
        _ => true,
    }
}

fn describe_st_error(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall | E::HeaderTooLarge | E::InvalidHeaderLength => {
            format!("{e} (file is {len} bytes; truncated or not safetensors?)")
        }
        E::MetadataIncompleteBuffer => format!("{e}: the file is truncated ({len} bytes)"),
        _ => e.to_string(),
    }
}

/// Writes `tensors` (name → tensor) to `path` atomically, with optional string metadata.
///
/// The bytes are a pure function of the input (names sorted, metadata sorted), unlike the
/// `safetensors` crate's writer, which orders metadata by `HashMap` iteration: a resumed training
/// run must produce a file identical to an uninterrupted one.
pub fn save_tensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    use safetensors::View;
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::Value::Object(m.into_iter().map(|(k, v)| (k, v.into())).collect()));
    }
    let mut blobs: Vec<Vec<u8>> = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in tensors {
        let t = t.contiguous()?;
        let data = t.data().into_owned();
        let end = offset + data.len();
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": format!("{:?}", t.dtype()), "shape": t.dims(), "data_offsets": [offset, end] }),
        );
        offset = end;
        blobs.push(data);
    }
    let mut head = serde_json::to_string(&serde_json::Value::Object(header))
        .map_err(|e| Error::Safetensors { file: path.to_path_buf(), msg: e.to_string() })?
        .into_bytes();
    // The format allows trailing spaces; pad so the data starts 8-byte aligned.
    while (8 + head.len()) % 8 != 0 {
        head.push(b' ');
    }
    crate::io::atomic::write_atomic_with(path, |f| {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for b in &blobs {
            w.write_all(b)?;
        }
        w.flush()
    })
}

/// Reads and parses a JSON file with errors naming it.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::NotFound { path: path.to_path_buf(), what: "file".into() }
        }
        _ => Error::io(path, e),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Json { file: path.to_path_buf(), msg: e.to_string() })
}
