//! deltatune: delta tuning (parameter-efficient fine-tuning) of frozen pre-trained transformers.
//!
//! The crate is layered bottom-up: [`ops`] (differentiable kernels) → [`backbone`] (frozen models whose
//! every module is a named [`backbone::Site`]) → [`delta`] (the methods that attach to sites) →
//! [`attach`] (name patterns → a plan). [`io`] and [`data`] are leaves used by all of them.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod assets;
pub mod attach;
pub mod backbone;
pub mod bench;
pub mod data;
pub mod delta;
pub mod error;
pub mod head;
pub mod io;
pub mod lm;
pub mod ops;
pub mod plot;
pub mod train;
pub mod search;
pub mod tuned;

pub use backbone::{bert::BertModel, Backbone, ForwardCtx, ModelOutput, Pooling, Site, SiteKind};
pub use data::tokenize::{EncodedBatch, Padding, TextEncoder};
pub use data::{Example, Label, LabelMap, MetricKind, TaskData, TaskKind, TaskOptions};
pub use error::{Error, Result};

/// Re-exported so that users of the library need no direct candle dependency for common types.
pub use candle_core::{DType, Device, Tensor, Var};
