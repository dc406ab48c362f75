//! deltatune's benchmarks, outside the library: the standard synthetic protocol and timing helpers
//! ([`measure`]), the one table of methods and learning rates ([`methods`]), and the side-by-side
//! runs against PyTorch + PEFT that `deltatune bench` prints ([`run`], arguments in [`args`]).
//! Speed is never asserted in a test; these print ratios against the reference run in the same
//! invocation.

pub mod args;
pub mod measure;
pub mod methods;
pub mod run;
pub mod serve;
mod soak;

pub use args::{BenchArgs, BenchWhat};
pub use run::run;
