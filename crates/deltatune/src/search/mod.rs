//! S3Delta: differentiable sparse structure search for delta tuning under a parameter budget.

pub mod gates;
pub mod output;
pub mod run;
pub mod space;

pub use run::{prepare, search, Budget, SearchConfig, SearchResult};
pub use space::{Candidate, Space};
