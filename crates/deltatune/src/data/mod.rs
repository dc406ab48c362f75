//! Text in: task data and its readers, seeded splits and batch order, tokenization.
//!
//! [`task`] defines what a data set is ([`TaskData`], [`Example`], [`Label`], [`LabelMap`]);
//! [`readers`] builds one from benchmark files, a folder per class, or user CSV/TSV/JSONL;
//! [`batching`] orders an epoch; [`tokenize`] turns text into padded tensors. Randomness here comes
//! only from [`rng`] and a caller's seed.

pub mod batching;
pub mod lines;
pub mod readers;
pub mod rng;
pub mod sources;
pub mod task;
pub mod tokenize;

pub use readers::{
    load_folder, load_task, load_user, read_user_split, task_names, Columns, Format, UserOptions, UserSplit,
};
pub use sources::DataSource;
pub use task::{Example, Label, LabelMap, MetricKind, TaskData, TaskKind, TaskOptions};
