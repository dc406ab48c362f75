//! Task heads: a linear layer over the pooled sequence representation, for classification
//! (`num_labels` logits, cross-entropy) or regression (one output, mean squared error). The head
//! trains with the deltas and is saved with them (`head.weight`, `head.bias`).

use crate::core::{ModelOutput, Pooling};
use crate::core::init::Stream;
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the head predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum HeadKind {
    Classification { num_labels: usize },
    Regression,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub kind: HeadKind,
    pub pooling: Pooling,
    pub hidden_size: usize,
}

impl HeadConfig {
    pub fn outputs(&self) -> usize {
        match self.kind {
            HeadKind::Classification { num_labels } => num_labels,
            HeadKind::Regression => 1,
        }
    }
}

#[derive(Debug)]
pub struct Head {
    pub config: HeadConfig,
    pub weight: Var, // (outputs, h)
    pub bias: Var,   // (outputs)
}

impl Head {
    /// A new head with torch's nn.Linear initialisation (weight and bias U(±1/√h)).
    pub fn new(config: HeadConfig, seed: u64, device: &Device) -> Result<Self> {
        let (o, h) = (config.outputs(), config.hidden_size);
        if o == 0 {
            return Err(Error::Delta("a classification head needs at least one label".into()));
        }
        let w = Stream::new(seed, &["head", "weight"]).kaiming_uniform(&[o, h], h, device)?;
        let b = Stream::new(seed, &["head", "bias"]).kaiming_uniform(&[o], h, device)?;
        Ok(Head { config, weight: Var::from_tensor(&w)?, bias: Var::from_tensor(&b)? })
    }

    /// Restores a saved head from its tensors (`head.weight`, `head.bias`).
    pub fn from_tensors(config: HeadConfig, tensors: &BTreeMap<String, Tensor>, origin: &str) -> Result<Self> {
        let get = |k: &str, shape: &[usize]| -> Result<Var> {
            let t = tensors.get(k).ok_or_else(|| Error::MissingTensor { file: origin.into(), key: k.into() })?;
            if t.dims() != shape {
                return Err(Error::ShapeMismatch { file: origin.into(), key: k.into(), expected: shape.to_vec(), got: t.dims().to_vec() });
            }
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
        };
        let (o, h) = (config.outputs(), config.hidden_size);
        Ok(Head { weight: get("head.weight", &[o, h])?, bias: get("head.bias", &[o])?, config })
    }

    pub fn params(&self) -> Vec<(String, Var)> {
        vec![("head.weight".into(), self.weight.clone()), ("head.bias".into(), self.bias.clone())]
    }

    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()
    }

    /// Logits (b, outputs) from the backbone's output.
    pub fn forward(&self, out: &ModelOutput) -> Result<Tensor> {
        let pooled = out.pool(self.config.pooling)?;
        ops::linear(&pooled, self.weight.as_tensor(), Some(self.bias.as_tensor()))
    }

    /// Mean loss of `logits` against `targets`: class indices (u32) for classification, floats for
    /// regression.
    pub fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self.config.kind {
            HeadKind::Classification { .. } => cross_entropy(logits, targets),
            HeadKind::Regression => {
                let pred = logits.squeeze(D::Minus1)?;
                Ok(pred.sub(&targets.to_dtype(DType::F32)?)?.sqr()?.mean_all()?)
            }
        }
    }
}

/// Mean cross-entropy of (b, c) logits against (b,) class indices.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = ops::log_softmax(logits)?;
    let picked = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
}
