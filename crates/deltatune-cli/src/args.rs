//! Command-line flags (clap derive). Values are resolved into library types in `commands/`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "deltatune", version, about = "Delta tuning (parameter-efficient fine-tuning) of pre-trained transformers")]
pub struct Cli {
    /// Worker threads for tensor kernels (default: all cores).
    #[arg(long, global = true, env = "DELTATUNE_THREADS")]
    pub threads: Option<usize>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch the default model and demo data into the cache ($DELTATUNE_HOME).
    Setup(SetupArgs),
    /// Print a model's module tree (with attached deltas) and parameter counts.
    Inspect(InspectArgs),
    /// Embed lines of text (mean-pooled sentence embeddings, one JSON array per line).
    Embed(EmbedArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local HF model directory (config.json, model.safetensors, tokenizer.json).
    /// Default: the default model (all-MiniLM-L6-v2), fetched on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SetupArgs {
    /// Fetch only the model.
    #[arg(long, conflicts_with = "data_only")]
    pub model_only: bool,
    /// Fetch only the demo data.
    #[arg(long)]
    pub data_only: bool,
    /// Print one JSON object with the installed paths.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object: model_type, total_params, trainable_params, modules.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input file with one text per line (default: standard input).
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    /// Output file (default: standard output).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Pooling over token states: mean or cls.
    #[arg(long, default_value = "mean")]
    pub pooling: String,
    /// L2-normalise the embeddings (what sentence-transformers does for this model).
    #[arg(long)]
    pub normalize: bool,
    /// Truncate texts to this many tokens (special tokens included).
    #[arg(long, default_value_t = 256)]
    pub max_length: usize,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}
