//! `deltatune search`: S3Delta structure search under a parameter budget.

use crate::args::SearchArgs;
use anyhow::Result;
use deltatune::api::{self, Cancel, SearchSpec};
use deltatune::search::gates::GateConfig;
use deltatune::search::run::SearchConfig;
use deltatune::search::space::Space;

pub fn run(a: SearchArgs, cancel: &Cancel) -> Result<()> {
    let (space, warnings) = Space::parse(&a.space)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let data = super::data_source(&a.data).ok_or_else(|| anyhow::anyhow!("invalid --task/--data: name the task to search on"))?;
    let model = match (&a.model.model, a.lm) {
        (None, true) => Some(deltatune::assets::default_decoder(&mut |m: &str| eprintln!("{m}"))?),
        (m, lm) => {
            if let (Some(m), true) = (m, lm) {
                if !deltatune::backbone::llama::is_decoder_path(m) {
                    anyhow::bail!("invalid --model: {} is not a decoder (a .gguf file or a Llama-family directory), but --lm asks for one", m.display());
                }
            }
            m.clone()
        }
    };
    let decoder = model.as_deref().is_some_and(deltatune::backbone::llama::is_decoder_path);
    let spec = SearchSpec {
        model,
        data,
        data_options: super::task_options(&a.data),
        max_length: a.max_length,
        budget: a.budget,
        space,
        pooling: a.pooling,
        config: SearchConfig {
            epochs: a.epochs,
            max_steps: a.max_steps,
            batch_size: a.batch_size,
            lr: a.lr,
            alpha_lr: a.alpha_lr,
            gates: GateConfig { beta: a.beta, tau: a.tau, renormalize: !a.no_renormalize },
            second_order: a.second_order,
            seed: a.seed,
            eval_every: a.eval_every,
            dropout: !a.no_dropout,
            ..Default::default()
        },
        out: a.out.clone(),
        overwrite: a.overwrite,
        candidates_only: a.candidates_only,
    };
    let r = super::with_control(a.quiet, Some(cancel), |ctl| api::search(&spec, ctl))?;
    if a.candidates_only {
        println!("{}", serde_json::json!({"space": r.space, "candidates": r.candidates, "space_params": r.space_params}));
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: chose {} of {} candidates, {} of {:.0} budget parameters ({:.0} s); supernet dev {}",
            r.task,
            r.selected,
            r.candidates,
            r.selected_params,
            r.budget,
            r.seconds,
            r.supernet_dev.map(|d| format!("{d:.4}")).unwrap_or_else(|| "-".into())
        );
        for s in &r.structure {
            println!("  {}: {}", s.name, s.to_json()["target_modules"]);
        }
        let path = a.out.join("structure.json");
        let train = if decoder { "train-lm" } else { "train" };
        println!("structure: {}  (retrain: deltatune {train} --delta-config {} ...)", path.display(), path.display());
    }
    Ok(())
}
