//! `deltatune train-lm`: deltas on a decoder LM with the causal-LM loss on completions.

use crate::args::TrainLmArgs;
use anyhow::{Context, Result};
use deltatune::api::{self, Cancel, LmData, TrainLmSpec};
use deltatune::train::lm::LmTrainConfig;

pub fn run(a: TrainLmArgs, cancel: &Cancel, world: Option<&dyn deltatune::dist::Collective>) -> Result<()> {
    let data = match (&a.task, &a.train) {
        (Some(task), None) => LmData::Task { name: task.clone(), root: a.data_dir.clone(), template: a.template.clone(), verbalizer: a.verbalizer.clone() },
        (None, Some(train)) => LmData::Pairs { train: train.clone(), dev: a.dev.clone() },
        _ => anyhow::bail!("give --task or --train"),
    };
    let spec = TrainLmSpec {
        model: a.model.clone(),
        deltas: {
            let mut d = a.delta.clone();
            if let Some(f) = &a.delta_config {
                let text = std::fs::read_to_string(f).with_context(|| format!("--delta-config: reading {}", f.display()))?;
                let (more, warnings) = deltatune::delta::spec::parse_config_file(&text, &f.display().to_string())?;
                for w in warnings {
                    eprintln!("warning: {w}");
                }
                d.extend(more);
            }
            d
        },
        data,
        max_train: a.max_train,
        max_dev: a.max_dev,
        chat: a.chat,
        config: LmTrainConfig {
            epochs: a.epochs,
            batch_size: a.batch_size,
            lr: a.lr,
            max_length: a.max_length,
            seed: a.seed,
            pack: a.pack,
            ..Default::default()
        },
        baseline: !a.no_baseline,
        out: a.out.clone(),
        overwrite: a.overwrite,
    };
    let r = super::train_ranks(a.data_parallel, a.json, cancel, world, |ctl| api::train_lm(&spec, ctl))?;
    if world.is_some_and(|w| w.rank() > 0) {
        return Ok(()); // rank 0 reports the run
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        match r.before {
            Some(b) => println!("{}: {b:.4} -> {:.4} after {} steps ({:.0} s)", r.metric, r.after, r.steps, r.train_seconds),
            None => println!("{}: {:.4} after {} steps ({:.0} s)", r.metric, r.after, r.steps, r.train_seconds),
        }
        if r.ranks > 1 {
            println!("  data-parallel over {} ranks; {:.1} s exchanging gradients", r.ranks, r.comm_seconds);
        }
    }
    Ok(())
}
