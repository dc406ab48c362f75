//! Frozen-prefix caching. When every delta sits at or above layer k, layers 0..k compute the same
//! activations for an example in every epoch (their dropout is switched off — the frozen prefix
//! acts as a fixed feature extractor). The layer-k inputs of every training example are computed
//! once, kept in memory up to a cap and spilled to a file beyond it (raw little-endian f32, valid
//! tokens only), and each step runs only layers k.. on them. The result equals an uncached run with
//! the same no-dropout prefix (tested).

use super::prepared::Prepared;
use crate::core::Backbone;
use crate::data::tokenize::Padding;
use crate::error::{Error, Result};
use crate::core::ForwardCtx;
use crate::data::tokenize::EncodedBatch;
use candle_core::{DType, Device, Tensor};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

enum Slot {
    Mem(Vec<f32>),
    Disk { offset: u64 },
}

/// Cached layer-k inputs of a split: one (len × h) block per example.
pub struct FrozenCache {
    pub k: usize,
    hidden: usize,
    lens: Vec<usize>,
    slots: Vec<Slot>,
    spill: Option<(PathBuf, Mutex<std::fs::File>)>,
    pub bytes_in_memory: usize,
    pub bytes_on_disk: u64,
}

impl FrozenCache {
    /// Runs the frozen prefix (embeddings and layers 0..k, no dropout) over `data` and caches the
    /// results, up to `cap_bytes` in memory and the rest in `spill_dir/frozen-cache.bin`.
    pub fn build(model: &dyn Backbone, data: &Prepared, k: usize, batch_size: usize, pad_id: u32, cap_bytes: usize, spill_dir: &Path) -> Result<Self> {
        let h = model.hidden_size();
        let n = data.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| data.encodings[i].input_ids.len());
        let mut slots: Vec<Option<Slot>> = (0..n).map(|_| None).collect();
        let lens: Vec<usize> = data.encodings.iter().map(|e| e.input_ids.len()).collect();
        let mut in_mem = 0usize;
        let mut spill: Option<(PathBuf, std::fs::File)> = None;
        let mut disk = 0u64;
        let ctx = ForwardCtx::eval();
        for chunk in order.chunks(batch_size.max(1)) {
            let encs: Vec<_> = chunk.iter().map(|&i| data.encodings[i].clone()).collect();
            let batch = EncodedBatch::collate(&encs, Padding::Longest, pad_id, model.device())?;
            let (hid, _, nv) = model.forward_until(&batch, k, &ctx, &mut Vec::new())?;
            if nv != 0 {
                return Err(Error::Delta("frozen-prefix caching does not apply with soft prompts".into()));
            }
            let rows = hid.to_dtype(DType::F32)?.to_vec3::<f32>()?;
            for (&i, row) in chunk.iter().zip(rows) {
                let flat: Vec<f32> = row.into_iter().take(lens[i]).flatten().collect();
                let bytes = flat.len() * 4;
                if in_mem + bytes <= cap_bytes {
                    in_mem += bytes;
                    slots[i] = Some(Slot::Mem(flat));
                } else {
                    if spill.is_none() {
                        std::fs::create_dir_all(spill_dir).map_err(|e| Error::io(spill_dir, e))?;
                        let p = spill_dir.join("frozen-cache.bin");
                        let f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&p).map_err(|e| Error::io(&p, e))?;
                        spill = Some((p, f));
                    }
                    if let Some((p, f)) = spill.as_mut() {
                        let raw: Vec<u8> = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
                        f.write_all(&raw).map_err(|e| Error::io(&*p, e))?;
                        slots[i] = Some(Slot::Disk { offset: disk });
                        disk += raw.len() as u64;
                    }
                }
            }
        }
        let slots = slots.into_iter().map(|s| s.ok_or_else(|| Error::Delta("frozen cache: an example was not cached".into()))).collect::<Result<Vec<_>>>()?;
        Ok(FrozenCache {
            k,
            hidden: h,
            lens,
            slots,
            spill: spill.map(|(p, f)| (p, Mutex::new(f))),
            bytes_in_memory: in_mem,
            bytes_on_disk: disk,
        })
    }

    fn read(&self, i: usize) -> Result<Vec<f32>> {
        match &self.slots[i] {
            Slot::Mem(v) => Ok(v.clone()),
            Slot::Disk { offset } => {
                let Some((p, f)) = &self.spill else { return Err(Error::Delta("frozen cache: spill file missing".into())) };
                let mut f = f.lock().map_err(|_| Error::Delta("frozen cache: spill file lock poisoned".into()))?;
                let mut raw = vec![0u8; self.lens[i] * self.hidden * 4];
                f.seek(SeekFrom::Start(*offset)).map_err(|e| Error::io(p, e))?;
                f.read_exact(&mut raw).map_err(|e| Error::io(p, e))?;
                Ok(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
        }
    }

    /// The cached hidden states (b, t, h) of examples `idx`, zero-padded to the longest, and the
    /// 0/1 mask (b, t).
    pub fn batch(&self, idx: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        self.batch_to(idx, 0, device)
    }

    /// [`Self::batch`] padded to at least `min_len` positions (a data-parallel shard is padded to
    /// the length of its whole batch).
    pub fn batch_to(&self, idx: &[usize], min_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let t = idx.iter().map(|&i| self.lens[i]).max().unwrap_or(0).max(min_len);
        let h = self.hidden;
        let mut data = vec![0f32; idx.len() * t * h];
        let mut mask = vec![0f32; idx.len() * t];
        for (r, &i) in idx.iter().enumerate() {
            let v = self.read(i)?;
            data[r * t * h..r * t * h + v.len()].copy_from_slice(&v);
            mask[r * t..r * t + self.lens[i]].iter_mut().for_each(|m| *m = 1.0);
        }
        Ok((Tensor::from_vec(data, (idx.len(), t, h), device)?, Tensor::from_vec(mask, (idx.len(), t), device)?))
    }
}

impl Drop for FrozenCache {
    fn drop(&mut self) {
        if let Some((p, _)) = &self.spill {
            let _ = std::fs::remove_file(p); // a leftover cache file is harmless; nothing to report
        }
    }
}
