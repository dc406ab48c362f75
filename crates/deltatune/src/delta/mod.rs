//! Delta modules: the small trainable pieces attached to a frozen backbone's sites.
//!
//! One file per method (its config, defaults, initialisation, hooks, merge and PEFT mapping),
//! the [`method::Method`] trait they implement, and the [`registry`] that lists them — adding a
//! method is one file and one registration line (see the registry's header). Shared building
//! blocks: [`bottleneck`] (adapters, Compacter) and [`additive`] (BitFit, LN tuning). Methods know
//! only [`crate::core`] and candle; they never import backbones, training or search code.

pub mod additive;
pub mod bottleneck;
pub mod lycoris;
pub mod method;
pub mod peft_fields;
pub mod registry;
pub mod spec;
pub mod targets;

pub mod adalora;
pub mod adapter;
pub mod bitfit;
pub mod compacter;
pub mod dora;
pub mod finetune;
pub mod ia3;
pub mod ln_tuning;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod low_rank_adapter;
pub mod oft;
pub mod parallel_adapter;
pub mod prefix;
pub mod prompt;
pub mod vera;

pub use adalora::AdaLoraConfig;
pub use adapter::{AdapterConfig, Placement};
pub use bitfit::BitFitConfig;
pub use bottleneck::{Activation, AdapterInit};
pub use compacter::CompacterConfig;
pub use dora::DoraConfig;
pub use finetune::FinetuneConfig;
pub use ia3::Ia3Config;
pub use ln_tuning::LnTuningConfig;
pub use loha::LohaConfig;
pub use lokr::{LokrConfig, LokrInit};
pub use lora::{LoraConfig, LoraInit};
pub use low_rank_adapter::LowRankAdapterConfig;
pub use method::{BuildCtx, Family, Method};
pub use oft::OftConfig;
pub use parallel_adapter::ParallelAdapterConfig;
pub use prefix::PrefixConfig;
pub use prompt::{PromptConfig, PromptInit};
pub use registry::{DeltaConfig, MethodInfo, METHODS};
pub use spec::DeltaSpec;
pub use targets::{TargetModules, Targets};
pub use vera::VeraConfig;
