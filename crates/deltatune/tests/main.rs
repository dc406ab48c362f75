//! Integration tests, built as one binary. Modules:
//! `parity` (PyTorch golden fixtures), `errors` (bad input gives clear errors).

mod common;
mod errors;
mod parity;
mod methods;
mod peft;
mod properties;
mod training;
