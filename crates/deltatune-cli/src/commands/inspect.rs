//! `deltatune inspect`: the module tree with attached deltas and parameter counts, or a dry run
//! of delta patterns.

use crate::args::InspectArgs;
use anyhow::Result;
use deltatune::api::{self, InspectSpec, Inspection};
use deltatune::core::tree::{fmt_count, fold_paths};

pub fn run(a: InspectArgs) -> Result<()> {
    let spec = InspectSpec { model: a.model.model.clone(), deltas: super::delta_sources(&a.deltas)?, seed: a.deltas.seed, dry_run: a.dry_run };
    let result = super::with_control(false, None, |ctl| api::inspect(&spec, ctl))?;
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    match result {
        Inspection::Tree { tree, decoder } => {
            print!("{}", tree.render());
            if let Some(d) = decoder {
                println!(
                    "base weights in memory: {:.1} MB (as f32: {:.1} MB, {:.2}x)",
                    d.weight_bytes as f64 / 1e6,
                    d.weight_bytes_f32 as f64 / 1e6,
                    d.weight_bytes_f32 as f64 / d.weight_bytes.max(1) as f64
                );
            }
        }
        Inspection::DryRun { patterns } => {
            for r in &patterns {
                match &r.error {
                    Some(e) => println!("{} `{}`: UNMATCHED — {e}", r.delta, r.pattern),
                    None => println!("{} `{}`: {} modules: {}", r.delta, r.pattern, fmt_count(r.matched.len()), fold_paths(&r.matched).join(", ")),
                }
            }
            let bad = patterns.iter().filter(|r| r.error.is_some()).count();
            println!("{} patterns matched, {bad} unmatched", patterns.len() - bad);
        }
    }
    Ok(())
}
