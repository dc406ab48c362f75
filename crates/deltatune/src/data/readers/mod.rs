//! Readers that turn files into a [`TaskData`]: named benchmark tasks under a data root
//! ([`load_task`]; layout and formats as in the shared data README), folder-per-class data
//! ([`load_folder`]) and the user's CSV/TSV/JSONL files ([`load_user`]). One file per format family;
//! `source.rs` holds decoding, label resolution and seeded splits shared by all of them.
//!
//! Every seeded split is a pure function of the task seed, and held-out parts keep file order, so
//! `max_train`/`max_dev` ("the first N") mean the same thing on every run.

mod common;
mod delimited;
mod folder;
mod glue;
mod jsonl;
mod sentences;
mod source;
mod superglue;
mod tasks;
mod user;

pub use folder::load_folder;
pub use tasks::{load_task, task_dir, task_names};
pub use user::{load_user, read_texts, read_user_split, Columns, Format, UserOptions, UserSplit};
