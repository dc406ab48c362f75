//! Training: for now only the evaluation metrics; the loop, optimizer groups, schedules and
//! checkpoints come later and live beside them.

pub mod metrics;
