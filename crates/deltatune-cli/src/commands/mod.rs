//! One file per subcommand; shared resolution of common flags.

mod bench;
mod generate;
mod train_lm;
mod embed;
mod evaluate;
mod plot;
mod predict;
mod search;
mod train;
mod export;
mod inspect;
mod merge;
mod setup;

use crate::args::{Cli, Command, DeltaArgs, ModelArgs};
use anyhow::{Context, Result};
use deltatune::attach::{self, AttachOptions};
use deltatune::delta::{spec::parse_config_file, DeltaSpec};
use deltatune::{BertModel, Device};
use std::path::{Path, PathBuf};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup(a) => setup::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => evaluate::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Search(a) => search::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Export(a) => export::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Generate(a) => generate::run(a),
        Command::TrainLm(a) => train_lm::run(a),
    }
}

/// Sizes the thread pools of our kernels and of candle's matmul before any tensor work.
pub fn setup_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            anyhow::bail!("invalid --threads: must be at least 1");
        }
        // candle reads RAYON_NUM_THREADS for its matmul; we also size the global pool explicitly.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        deltatune::ops::set_threads(n).context("configuring the thread pool")?;
    }
    Ok(())
}

/// Progress lines of asset fetching go to stderr.
pub fn progress(msg: &str) {
    eprintln!("{msg}");
}

/// `--model` or the default model (fetched on first use).
pub fn model_dir(m: &ModelArgs) -> Result<PathBuf> {
    match &m.model {
        Some(p) => Ok(p.clone()),
        None => Ok(deltatune::assets::default_model(&mut progress)?),
    }
}

/// New delta specs from `--delta SPEC` and `--delta-config FILE` (saved delta directories are
/// returned separately). Config-file warnings go to stderr.
pub fn delta_specs(d: &DeltaArgs) -> Result<(Vec<DeltaSpec>, Vec<PathBuf>)> {
    let mut specs = Vec::new();
    let mut dirs = Vec::new();
    for v in &d.delta {
        let p = Path::new(v);
        if p.is_dir() {
            dirs.push(p.to_path_buf());
        } else if v.contains('/') && !v.contains(':') {
            anyhow::bail!("invalid --delta: {v}: no such delta directory");
        } else {
            specs.push(DeltaSpec::parse_cli(v)?);
        }
    }
    if let Some(f) = &d.delta_config {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let (more, warnings) = parse_config_file(&text, &f.display().to_string())?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        specs.extend(more);
    }
    Ok((specs, dirs))
}

/// Loads the model and attaches every delta given on the command line.
pub fn model_with_deltas(m: &ModelArgs, d: &DeltaArgs) -> Result<(BertModel, Vec<DeltaSpec>)> {
    let (specs, dirs) = delta_specs(d)?;
    let dir = model_dir(m)?;
    let mut model = BertModel::load(&dir, &Device::Cpu)?;
    let mut all = Vec::new();
    for p in dirs {
        let loaded = deltatune::tuned::load_delta(&p, &mut model, AttachOptions::default())?;
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        all.extend(loaded.specs);
    }
    attach::attach(&mut model, &specs, AttachOptions { seed: d.seed, tokenizer: None })?;
    all.extend(specs);
    Ok((model, all))
}

/// The data source named by `--task` / `--data` / `--train`, if any.
pub fn data_source(d: &crate::args::DataArgs) -> Result<Option<deltatune::train::run::DataSource>> {
    use deltatune::data::readers::{Columns, Format};
    use deltatune::train::run::DataSource;
    let columns = || Columns { text: d.text_col.clone(), text_pair: d.text_pair_col.clone(), label: d.label_col.clone() };
    let format = d.format.as_deref().map(|f| f.parse::<Format>()).transpose().context("invalid --format")?;
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    Ok(match (&d.task, &d.data, &d.train) {
        (Some(t), _, _) if t == "bbc-news" || t == "demo" => Some(DataSource::Demo),
        (Some(t), _, _) => Some(DataSource::Task { name: t.clone(), root: absolute(&d.data_dir) }),
        (None, Some(p), _) if p.is_dir() => Some(DataSource::Folder { path: absolute(p) }),
        (None, Some(p), _) | (None, None, Some(p)) => Some(DataSource::User {
            train: absolute(p),
            dev: d.dev.as_deref().map(absolute),
            columns: columns(),
            format,
            regression: d.regression,
        }),
        (None, None, None) => None,
    })
}

/// Split options from the data flags.
pub fn task_options(d: &crate::args::DataArgs) -> deltatune::data::TaskOptions {
    deltatune::data::TaskOptions { seed: d.split_seed, dev_fraction: d.dev_fraction, max_train: d.max_train, max_dev: d.max_dev }
}

/// A trained delta directory: `DIR` itself, or `DIR/best` when DIR is a run directory.
pub fn trained_delta_dir(p: &Path) -> PathBuf {
    if p.join("best").join(deltatune::delta::store::CONFIG_FILE).is_file() {
        p.join("best")
    } else {
        p.to_path_buf()
    }
}
