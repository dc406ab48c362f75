//! One file per subcommand, each mapping its parsed flags onto a library job spec
//! (`deltatune::api`) and printing the result; shared mapping of the common flags here.

mod embed;
mod evaluate;
mod export;
mod generate;
mod inspect;
mod merge;
mod plot;
mod predict;
pub mod progress;
mod search;
mod serve;
mod setup;
mod train;
mod train_lm;

use crate::args::{Cli, Command, DataArgs, DeltaArgs};
use anyhow::{Context, Result};
use deltatune::api::{Cancel, Control, DeltaSource};
use deltatune::data::readers::Columns;
use deltatune::dist::Collective;
use deltatune::data::{DataSource, TaskOptions};
use deltatune::delta::spec::parse_config_file;
use progress::Reporter;
use std::path::Path;

/// Runs the command; `world` is the data-parallel job `train` and `train-lm` join when started by
/// an MPI launcher (see `crate::world`).
pub fn run(cli: Cli, cancel: &Cancel, world: Option<&dyn Collective>) -> Result<()> {
    match cli.command {
        Command::Setup(a) => setup::run(a),
        Command::Train(a) => train::run(a, cancel, world),
        Command::Eval(a) => evaluate::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Search(a) => search::run(a, cancel),
        Command::Inspect(a) => inspect::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Export(a) => export::run(a),
        Command::Bench(a) => deltatune_bench::run(a),
        Command::Generate(a) => generate::run(a),
        Command::TrainLm(a) => train_lm::run(a, cancel, world),
        Command::Serve(a) => serve::run(a),
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

/// Runs `job` with events rendered on stderr (warnings only when `quiet`) and `cancel` as its
/// stop flag.
pub fn with_control<T>(quiet: bool, cancel: Option<&Cancel>, job: impl FnOnce(&Control) -> deltatune::Result<T>) -> Result<T> {
    let reporter = Reporter::quiet_if(quiet);
    let ctl = Control::new(&reporter, cancel);
    Ok(job(&ctl)?)
}

/// [`with_control`] for a job that may train data-parallel: ranks other than 0 report nothing
/// (rank 0 speaks for the job; errors are printed by every rank).
pub fn with_world_control<T>(
    quiet: bool,
    cancel: Option<&Cancel>,
    world: Option<&dyn Collective>,
    job: impl FnOnce(&Control) -> deltatune::Result<T>,
) -> Result<T> {
    let reporter = Reporter::quiet_if(quiet);
    let silent = deltatune::control::Silent;
    let rank = world.map_or(0, |w| w.rank());
    let ctl = Control::new(if rank == 0 { &reporter } else { &silent }, cancel);
    let ctl = match world {
        Some(w) => ctl.with_world(w),
        None => ctl,
    };
    Ok(job(&ctl)?)
}

/// Runs a training job data-parallel over `ranks` threads of this process (when more than one)
/// or as the process's MPI rank (`world`), and returns rank 0's result. Under threads, a rank that
/// fails ends the process — the others may be waiting for it in an exchange; checkpoints are
/// written aside and renamed, so the last one is intact.
pub fn train_ranks<T: Send>(
    ranks: u32,
    quiet: bool,
    cancel: &Cancel,
    world: Option<&dyn Collective>,
    job: impl Fn(&Control) -> deltatune::Result<T> + Sync,
) -> Result<T> {
    if ranks <= 1 {
        return with_world_control(quiet, Some(cancel), world, job);
    }
    if world.is_some() {
        anyhow::bail!("invalid --data-parallel: not under mpirun (the launcher's ranks already split each batch)");
    }
    static FAILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let runs = deltatune::dist::threads::run_split(ranks as usize, |w| {
        let r = with_world_control(quiet, Some(cancel), Some(w), &job);
        if let Err(e) = &r {
            let _guard = FAILING.lock();
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        r
    })?;
    runs.into_iter().next().ok_or_else(|| anyhow::anyhow!("no rank ran"))?
}

/// Every delta given by `--delta` (specs and saved directories, in order) and `--delta-config`
/// (specs; the file's warnings go to stderr).
pub fn delta_sources(d: &DeltaArgs) -> Result<Vec<DeltaSource>> {
    let mut out = d.delta.clone();
    if let Some(f) = &d.delta_config {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let (more, warnings) = parse_config_file(&text, &f.display().to_string())?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        out.extend(more.into_iter().map(DeltaSource::Spec));
    }
    Ok(out)
}

/// The data source named by `--task` / `--data` / `--train`, if any.
pub fn data_source(d: &DataArgs) -> Option<DataSource> {
    let columns = || Columns { text: d.text_col.clone(), text_pair: d.text_pair_col.clone(), label: d.label_col.clone() };
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (&d.task, &d.data, &d.train) {
        (Some(t), _, _) if t == "bbc-news" || t == "demo" => Some(DataSource::Demo),
        (Some(t), _, _) => Some(DataSource::Task { name: t.clone(), root: absolute(&d.data_dir) }),
        (None, Some(p), _) if p.is_dir() => Some(DataSource::Folder { path: absolute(p) }),
        (None, Some(p), _) | (None, None, Some(p)) => Some(DataSource::User {
            train: absolute(p),
            dev: d.dev.as_deref().map(absolute),
            columns: columns(),
            format: d.format,
            regression: d.regression,
        }),
        (None, None, None) => None,
    }
}

/// Split options from the data flags.
pub fn task_options(d: &DataArgs) -> TaskOptions {
    TaskOptions { seed: d.split_seed, dev_fraction: d.dev_fraction, max_train: d.max_train, max_dev: d.max_dev }
}
