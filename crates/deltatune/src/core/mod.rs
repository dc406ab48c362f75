//! The bottom layer shared by backbones and delta methods: sites and their kinds
//! ([`site`]), the forward context and outputs ([`forward`]), the delta contract ([`delta`]), the
//! [`Backbone`] trait ([`backbone`]), the module-tree snapshot ([`tree`]) and the deterministic
//! initialisers ([`init`]). Backbones and methods depend on this module and never on each other.

pub mod backbone;
pub mod delta;
pub mod forward;
pub mod init;
pub mod site;
pub mod tree;

pub use backbone::Backbone;
pub use delta::{Attached, BackboneInfo, Delta, EngineHook, GroupTensors, GroupTrainer, HookCtx};
pub use forward::{l2_normalize, mean_pool, ForwardCtx, ModelOutput, Pooling, RowRoute};
pub use site::{Site, SiteKind};
pub use tree::{fmt_count, fold_paths, ModuleTree, SiteInfo};
