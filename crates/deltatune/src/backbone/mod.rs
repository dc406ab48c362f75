//! Frozen pre-trained models that expose every module as a named site
//! ([`crate::core::Site`]): the BERT family ([`bert`]) and Llama-family decoders ([`llama`]).
//! Backbones depend on [`crate::core`] for what they share with the delta methods, never on
//! the methods themselves.

pub mod bert;
pub mod config;
pub mod llama;
