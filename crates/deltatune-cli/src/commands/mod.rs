//! One file per subcommand; shared resolution of common flags.

mod embed;
mod inspect;
mod setup;

use crate::args::{Cli, Command, ModelArgs};
use anyhow::{Context, Result};
use std::path::PathBuf;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup(a) => setup::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Embed(a) => embed::run(a),
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
