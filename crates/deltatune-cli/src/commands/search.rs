//! `deltatune search`: S3Delta structure search under a parameter budget.

use crate::args::SearchArgs;
use anyhow::Result;
use deltatune::head::{Head, HeadConfig};
use deltatune::search::gates::GateConfig;
use deltatune::search::{output, prepare, search, Budget, SearchConfig, Space};
use deltatune::train::task::{head_kind, prepare_split, scorer};
use deltatune::tuned::TaskModel;
use deltatune::{Backbone, BertModel, Device, Pooling, TextEncoder};
use serde_json::json;

pub fn run(a: SearchArgs) -> Result<()> {
    let budget_arg = Budget::parse(&a.budget)?;
    let (space, warnings) = Space::parse(&a.space)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let source = super::data_source(&a.data)?.ok_or_else(|| anyhow::anyhow!("invalid --task/--data: name the task to search on"))?;
    if a.out.join("search.json").exists() && !a.overwrite {
        anyhow::bail!("invalid --out: {} holds a previous search; pass --overwrite to replace it", a.out.display());
    }
    let say = |m: &str| {
        if !a.quiet {
            eprintln!("{m}");
        }
    };
    let task = source.load(&super::task_options(&a.data), &mut |m| say(m))?;
    let mut backbone = BertModel::load(&super::model_dir(&a.model)?, &Device::Cpu)?;
    let enc = TextEncoder::from_file(&backbone.files.tokenizer, a.max_length)?;
    let train = prepare_split(&task.train, &enc)?;
    let dev = prepare_split(&task.dev, &enc)?;
    let cands = space.candidates(&mut backbone)?;
    let total = backbone.num_params();
    let budget = budget_arg.params(total);
    let space_total: usize = cands.iter().map(|c| c.params).sum();
    if a.candidates_only {
        std::fs::create_dir_all(&a.out)?;
        let rows: Vec<_> = cands.iter().map(|c| json!({"id": c.id, "method": c.method, "path": c.path, "layer": c.layer, "position": c.position, "params": c.params})).collect();
        deltatune::io::write_json_atomic(&a.out.join("candidates.json"), &rows)?;
        println!("{}", json!({"space": space.name, "candidates": cands.len(), "space_params": space_total}));
        return Ok(());
    }
    let cheapest = cands.iter().map(|c| c.params).min().unwrap_or(0);
    if budget < cheapest as f64 {
        anyhow::bail!(
            "invalid --budget: {budget:.0} parameters ({:.5}% of {total}) is smaller than the cheapest candidate of space {} ({cheapest} parameters)",
            100.0 * budget / total as f64,
            space.name
        );
    }
    say(&format!(
        "space {}: {} candidates, {} parameters in all; budget {budget:.0} ({:.5}% of the backbone's {total}; the head is outside the budget)",
        space.name,
        cands.len(),
        space_total,
        100.0 * budget / total as f64
    ));
    let pooling: Pooling = a.pooling.parse()?;
    let head = Head::new(HeadConfig { kind: head_kind(task.kind), pooling, hidden_size: backbone.hidden_size() }, a.seed, backbone.device())?;
    let mut model = TaskModel { backbone, head, specs: Vec::new() };
    let cfg = SearchConfig {
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
    };
    std::fs::create_dir_all(&a.out)?;
    let result = if budget >= space_total as f64 {
        eprintln!(
            "warning: the budget ({budget:.0}) is at least what the whole space can use ({space_total}); every candidate is selected and no search is run"
        );
        let all: Vec<usize> = (0..cands.len()).collect();
        deltatune::search::SearchResult {
            budget,
            steps: 0,
            seconds: 0.0,
            alphas: vec![0.0; cands.len()],
            probs: vec![1.0; cands.len()],
            selected: all,
            selected_params: space_total,
            best_dev: None,
            best_step: None,
        }
    } else {
        prepare(&mut model, &cands, a.seed)?;
        let sc = scorer(&task);
        search(&mut model, &cands, budget, &train, Some(&dev), &sc, &cfg, &a.out, enc.pad_id(), a.quiet)?
    };
    let summary = json!({
        "task": task.name, "space": space.name, "candidates": cands.len(), "space_params": space_total,
        "budget": budget, "budget_percent": 100.0 * budget / total as f64, "backbone_params": total,
        "selected": result.selected.len(), "selected_params": result.selected_params,
        "supernet_dev": result.best_dev, "best_step": result.best_step, "steps": result.steps, "seconds": result.seconds,
        "config": cfg, "second_order": a.second_order,
    });
    let specs = output::write(&a.out, &cands, &result, summary.clone())?;
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "{}: chose {} of {} candidates, {} of {budget:.0} budget parameters ({:.0} s); supernet dev {}",
            task.name,
            result.selected.len(),
            cands.len(),
            result.selected_params,
            result.seconds,
            result.best_dev.map(|d| format!("{d:.4}")).unwrap_or_else(|| "-".into())
        );
        for s in &specs {
            println!("  {}: {}", s.name, s.to_json()["target_modules"]);
        }
        println!("structure: {}  (retrain: deltatune train --delta-config {} ...)", a.out.join("structure.json").display(), a.out.join("structure.json").display());
    }
    Ok(())
}
