//! deltatune: delta tuning (parameter-efficient fine-tuning) of frozen pre-trained transformers.
//!
//! The crate is layered; a module imports only from the layers below it (checked by the test
//! suite, see ARCHITECTURE.md):
//!
//! 1. [`error`], [`control`] (progress events, cancellation), [`io`] (file formats and safety),
//!    [`ops`] (differentiable kernels), [`plot`], [`assets`] — leaves;
//! 2. [`data`] — tasks, readers, tokenization;
//! 3. [`core`] — what backbones and deltas share: sites, the forward context, the delta trait;
//! 4. [`backbone`] (frozen models) and [`delta`] (the methods and their registry), side by side;
//! 5. [`attach`] — name patterns → a plan → deltas on sites;
//! 6. [`head`], [`lm`] (decoders with their tokenizer, generation);
//! 7. [`artifacts`] — every saved file: delta directories, PEFT folders, merged models;
//! 8. [`train`], then [`search`];
//! 9. [`api`] — one typed entry point per job, used by the CLI, the server and Python.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod artifacts;
pub mod assets;
pub mod attach;
pub mod backbone;
pub mod control;
pub mod core;
pub mod data;
pub mod delta;
pub mod dist;
pub mod error;
pub mod head;
pub mod io;
pub mod lm;
pub mod ops;
pub mod plot;
pub mod search;
pub mod train;

pub use crate::core::{Backbone, ForwardCtx, ModelOutput, Pooling, Site, SiteKind};
pub use backbone::bert::BertModel;
pub use data::tokenize::{EncodedBatch, Padding, TextEncoder};
pub use data::{Example, Label, LabelMap, MetricKind, TaskData, TaskKind, TaskOptions};
pub use error::{Error, Result};

/// Re-exported so that users of the library need no direct candle dependency for common types.
pub use candle_core::{DType, Device, Tensor, Var};
