//! One typed entry point per job — train, evaluate, predict, embed, search, generate, train a
//! decoder, merge, export, inspect — each a spec in and a result out, with progress and
//! cancellation through [`Control`]. The CLI maps flags onto these specs and prints the results;
//! the server and the Python package call the same functions.
//!
//! ```no_run
//! use deltatune::api::{self, Control};
//! let spec = api::EmbedSpec {
//!     model: None,
//!     deltas: vec![api::DeltaSource::parse("lora:r=8").unwrap()],
//!     seed: 42,
//!     texts: vec!["Delta tuning trains a few parameters.".into()],
//!     pooling: deltatune::Pooling::Mean,
//!     normalize: true,
//!     max_length: 128,
//!     batch_size: 32,
//! };
//! let mut rows = Vec::new();
//! api::embed(&spec, &Control::silent(), &mut |batch| {
//!     rows.extend(batch);
//!     Ok(())
//! })
//! .unwrap();
//! ```

pub mod common;
pub mod embed;
pub mod evaluate;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod search;
pub mod train;
pub mod train_lm;

pub use crate::control::{Cancel, Control, Event, Progress, Silent};
pub use common::{encoder_dir, decoder_path, encoder_with_deltas, trained_delta_dir, DeltaSource};
pub use embed::{embed, embed_with, EmbedSpec};
pub use evaluate::{evaluate, load_task_model, predict, predict_with, EvalResult, EvalSpec, Prediction, PredictSpec, Split};
pub use export::{export, ExportFormat, ExportResult, ExportSpec};
pub use generate::{generate, GenerateSpec, Prompt};
pub use inspect::{inspect, DecoderMemory, InspectSpec, Inspection};
pub use merge::{merge, parse_dtype, MergeResult, MergeSpec};
pub use search::{search, SearchOutcome, SearchSpec};
pub use train::{train, RunMode, TrainResult, TrainSpec};
pub use train_lm::{train_lm, LmData, TrainLmResult, TrainLmSpec};
