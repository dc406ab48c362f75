//! [`Prepared`] splits (tokenized examples with numeric targets) and the [`Scores`] a
//! [`Scorer`] computes from predictions.

use crate::data::tokenize::{EncodedBatch, Encoding, Padding};
use crate::error::Result;
use crate::head::HeadKind;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;

/// A tokenized split: encodings and numeric targets (class index or regression value).
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    pub encodings: Vec<Encoding>,
    pub targets: Vec<f32>,
}

impl Prepared {
    pub fn len(&self) -> usize {
        self.encodings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.encodings.is_empty()
    }

    pub fn lengths(&self) -> Vec<usize> {
        self.encodings.iter().map(|e| e.input_ids.len()).collect()
    }

    /// The padded batch of examples `idx` and its targets (u32 classes or f32 values).
    pub fn batch(&self, idx: &[usize], kind: HeadKind, pad_id: u32, device: &Device) -> Result<(EncodedBatch, Tensor)> {
        self.batch_padded(idx, kind, pad_id, Padding::Longest, device)
    }

    /// The longest encoding among examples `idx`.
    pub fn longest(&self, idx: &[usize]) -> usize {
        idx.iter().map(|&i| self.encodings[i].input_ids.len()).max().unwrap_or(0)
    }

    /// [`Self::batch`] with the padding given (a data-parallel shard is padded to the length of
    /// its whole batch).
    pub fn batch_padded(&self, idx: &[usize], kind: HeadKind, pad_id: u32, padding: Padding, device: &Device) -> Result<(EncodedBatch, Tensor)> {
        let encs: Vec<Encoding> = idx.iter().map(|&i| self.encodings[i].clone()).collect();
        let batch = EncodedBatch::collate(&encs, padding, pad_id, device)?;
        let t: Vec<f32> = idx.iter().map(|&i| self.targets[i]).collect();
        let targets = match kind {
            HeadKind::Classification { .. } => Tensor::from_vec(t.iter().map(|&x| x as u32).collect::<Vec<u32>>(), idx.len(), device)?,
            HeadKind::Regression => Tensor::from_vec(t, idx.len(), device)?.to_dtype(DType::F32)?,
        };
        Ok((batch, targets))
    }
}

/// Metric values of one evaluation; `primary` selects the best checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scores {
    pub primary: String,
    pub values: BTreeMap<String, f64>,
}

impl Scores {
    pub fn primary_value(&self) -> f64 {
        self.values.get(&self.primary).copied().unwrap_or(f64::NAN)
    }
}

/// Computes the task's metrics from predictions (class index or value per example) and gold.
pub type Scorer<'a> = dyn Fn(&[f32], &[f32]) -> Result<Scores> + 'a;
