//! `deltatune inspect`: the module tree with attached deltas and parameter counts, or a dry run
//! of delta patterns.

use crate::args::InspectArgs;
use anyhow::Result;
use deltatune::backbone::tree::{fmt_count, fold_paths};
use deltatune::{attach, Backbone, BertModel, Device};

pub fn run(a: InspectArgs) -> Result<()> {
    if a.dry_run {
        return dry_run(a);
    }
    let (model, _specs) = super::model_with_deltas(&a.model, &a.deltas)?;
    let tree = model.tree();
    if a.json {
        println!("{}", serde_json::to_string(&tree)?);
    } else {
        print!("{}", tree.render());
    }
    Ok(())
}

fn dry_run(a: InspectArgs) -> Result<()> {
    let (specs, dirs) = super::delta_specs(&a.deltas)?;
    if !dirs.is_empty() {
        anyhow::bail!("--dry-run checks delta specs; saved delta directories need no dry run");
    }
    let model = BertModel::load(&super::model_dir(&a.model)?, &Device::Cpu)?;
    let plan = attach::dry_run(&model.tree(), &specs)?;
    if a.json {
        println!("{}", serde_json::json!({ "patterns": plan.report }));
        return Ok(());
    }
    for r in &plan.report {
        match &r.error {
            Some(e) => println!("{} `{}`: UNMATCHED — {e}", r.delta, r.pattern),
            None => println!("{} `{}`: {} modules: {}", r.delta, r.pattern, fmt_count(r.matched.len()), fold_paths(&r.matched).join(", ")),
        }
    }
    let bad = plan.report.iter().filter(|r| r.error.is_some()).count();
    println!("{} patterns matched, {bad} unmatched", plan.report.len() - bad);
    Ok(())
}
