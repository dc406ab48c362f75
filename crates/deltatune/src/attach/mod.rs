//! Attaching deltas by name: patterns over the module tree → a deterministic [`Plan`] → deltas
//! built and attached to the backbone's sites.
//!
//! Matching follows PEFT's `check_target_module_exists` where the two overlap, so configs carry
//! over: a list entry matches a path equal to it or ending with `.` + entry; a single string is a
//! full-match regex; `layers_to_transform` keeps only modules inside those layers (an exact-path
//! entry skips the layer filter, as in PEFT); `exclude_modules` removes matches. Our extensions:
//! list entries starting with `re:` are full-match regexes, and OpenDelta-style aliases
//! ([`aliases`]) compile down to explicit names. Every pattern that matches nothing is an error
//! listing the nearest valid paths.

pub mod aliases;
mod apply;
mod plan;

pub use apply::{attach, count_trainable, delta_vars, delta_names, detach_named, group_tensors, group_trainers, group_vars, saved_vars, frozen_prefix_layers, merge_all, remove_all, set_enabled, trainable_vars, unmerge_all, AttachOptions};
pub use plan::{dry_run, plan, PatternReport, Plan, PlanEntry};
