//! S3Delta: differentiable sparse structure search for delta tuning under a parameter budget.

pub mod gates;
