//! Evaluation and prediction: batched eval-mode forward passes over a prepared split (longest
//! first for little padding; results returned in the original order).

use super::prepared::{Prepared, Scorer, Scores};
use crate::error::Result;
use crate::head::HeadKind;
use crate::artifacts::TaskModel;
use crate::core::{Backbone, ForwardCtx};
use candle_core::{DType, D};

/// Predictions and scores of one pass over a split.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Class index (classification) or value (regression) per example.
    pub predictions: Vec<f32>,
    /// Logits per example (probabilities follow by softmax).
    pub logits: Vec<Vec<f32>>,
    /// Mean loss (when the split has targets).
    pub loss: f64,
    pub scores: Option<Scores>,
}

/// Runs the model over `data` and returns predictions in the split's order.
pub fn predict(model: &TaskModel, data: &Prepared, batch_size: usize, pad_id: u32) -> Result<(Vec<f32>, Vec<Vec<f32>>, f64)> {
    let n = data.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(data.encodings[i].input_ids.len()));
    let mut preds = vec![0f32; n];
    let mut logits_all = vec![Vec::new(); n];
    let mut loss_sum = 0f64;
    let ctx = ForwardCtx::eval();
    let kind = model.head.config.kind;
    for chunk in order.chunks(batch_size.max(1)) {
        let (batch, targets) = data.batch(chunk, kind, pad_id, model.backbone.device())?;
        let logits = model.logits(&batch, &ctx)?;
        loss_sum += model.head.loss(&logits, &targets)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let p: Vec<f32> = match kind {
            HeadKind::Classification { .. } => logits.argmax(D::Minus1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            HeadKind::Regression => logits.squeeze(D::Minus1)?.to_vec1::<f32>()?,
        };
        let rows = logits.to_vec2::<f32>()?;
        for ((&i, p), row) in chunk.iter().zip(p).zip(rows) {
            preds[i] = p;
            logits_all[i] = row;
        }
    }
    Ok((preds, logits_all, if n == 0 { 0.0 } else { loss_sum / n as f64 }))
}

/// Predicts and scores `data` with `scorer`.
pub fn evaluate(model: &TaskModel, data: &Prepared, batch_size: usize, pad_id: u32, scorer: &Scorer) -> Result<Evaluation> {
    let (predictions, logits, loss) = predict(model, data, batch_size, pad_id)?;
    let scores = Some(scorer(&predictions, &data.targets)?);
    Ok(Evaluation { predictions, logits, loss, scores })
}
