//! Training: optimisation, the resumable loop, checkpoints, metrics and plots.

pub mod optim;
