//! Integration tests, built as one binary. Modules:
//! `parity` (PyTorch golden fixtures), `errors` (bad input gives clear errors),
//! `data` (task readers on the shared benchmark data and on bad user files).

mod adalora;
mod chat_templates;
mod common;
mod data;
mod decoder;
mod errors;
mod fuzz;
mod gemma3;
mod layers;
mod llamacpp_adapter;
mod parity;
mod methods;
mod peft;
mod properties;
mod search;
mod tiny_decoders;
mod training;
