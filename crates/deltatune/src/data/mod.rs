//! Text in: task data, seeded batch order, tokenization.
//!
//! [`task`] defines what a data set is ([`TaskData`], [`Example`], [`Label`], [`LabelMap`]);
//! [`batching`] orders an epoch; [`tokenize`] turns text into padded tensors. Randomness here comes
//! only from [`rng`] and a caller's seed.

pub mod batching;
pub mod lines;
pub mod rng;
pub mod task;
pub mod tokenize;

pub use task::{Example, Label, LabelMap, MetricKind, TaskData, TaskKind, TaskOptions};
