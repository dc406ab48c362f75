//! Training: optimisation, the resumable loop, checkpoints, evaluation, metrics and logs, for
//! encoders (task heads, [`fit`]) and decoders (causal-LM loss, [`lm`]).
//!
//! The loop works on [`prepared::Prepared`] splits (tokenized examples with numeric targets) and a
//! [`prepared::Scorer`] that turns predictions into the task's metrics, so it knows nothing about
//! file formats; `data` turns tasks into prepared splits.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod fit;
pub mod lm;
pub mod log;
pub mod metrics;
pub mod optim;
pub mod prepared;
pub mod task;

pub use config::TrainConfig;
pub use eval::{evaluate, predict, Evaluation};
pub use fit::{fit, FitOptions, FitResult};
pub use prepared::{Prepared, Scorer, Scores};
