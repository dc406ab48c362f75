//! [`TrainConfig`]: the hyperparameters of an encoder training run, validated once.

use super::optim::{AdamWConfig, Decay};
use crate::core::Pooling;
use crate::error::{check, Result};
use serde::{Deserialize, Serialize};

/// Hyperparameters of a training run. Defaults follow the PEFT baseline protocol where it has one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub lr: f64,
    /// Epochs (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Optimizer steps; overrides `epochs`.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Share of steps spent warming up (used when `warmup_steps` is unset).
    pub warmup_ratio: f64,
    pub warmup_steps: Option<usize>,
    pub decay: Decay,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm (none when unset).
    pub max_grad_norm: Option<f64>,
    pub max_length: usize,
    pub seed: u64,
    /// Evaluate on dev every N optimizer steps (also at the end of every epoch when unset).
    pub eval_every: Option<usize>,
    pub eval_batch_size: usize,
    /// Stop after this many evaluations without improvement.
    pub patience: Option<usize>,
    /// Group examples of similar length into batches.
    pub bucketed: bool,
    /// Dropout of the backbone during training (false: none).
    pub dropout: bool,
    /// Write `checkpoints/last` every N optimizer steps (and after every evaluation).
    pub checkpoint_every: usize,
    pub pooling: Pooling,
    /// Compute the frozen layers below the lowest delta once and train from the cache
    /// (implies `frozen_prefix_dropout = false`).
    pub cache_frozen: bool,
    /// Dropout in the frozen layers below the lowest delta (false: they run as a fixed feature
    /// extractor, as with the cache).
    pub frozen_prefix_dropout: bool,
    /// Memory cap of the frozen cache in MiB; the rest spills to the run directory.
    pub cache_mb: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 5e-4,
            epochs: 1,
            max_steps: None,
            batch_size: 32,
            grad_accum: 1,
            warmup_ratio: 0.06,
            warmup_steps: None,
            decay: Decay::Linear,
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            max_length: 128,
            seed: 42,
            eval_every: None,
            eval_batch_size: 64,
            patience: None,
            bucketed: true,
            dropout: true,
            checkpoint_every: 50,
            pooling: Pooling::Mean,
            cache_frozen: false,
            frozen_prefix_dropout: true,
            cache_mb: 2048,
        }
    }
}

impl TrainConfig {
    /// Checks every setting against its range; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        check::positive("--lr", self.lr)?;
        check::at_least("--batch-size", self.batch_size, 1)?;
        check::at_least("--grad-accum", self.grad_accum, 1)?;
        match self.max_steps {
            Some(n) => check::at_least("--max-steps", n, 1)?,
            None => check::at_least("--epochs", self.epochs, 1)?,
        }
        check::in_range("--warmup-ratio", self.warmup_ratio, 0.0, 1.0, false)?;
        if let Some(n) = self.max_grad_norm {
            check::positive("--max-grad-norm", n)?;
        }
        check::non_negative("--weight-decay", self.adamw.weight_decay)?;
        if let Some(e) = self.eval_every {
            check::at_least("--eval-every", e, 1)?;
        }
        check::at_least("--eval-batch-size", self.eval_batch_size, 1)?;
        check::at_least("--checkpoint-every", self.checkpoint_every, 1)?;
        if let Some(p) = self.patience {
            check::at_least("--patience", p, 1)?;
        }
        check::at_least("--max-length", self.max_length, 2)?;
        Ok(())
    }
}
