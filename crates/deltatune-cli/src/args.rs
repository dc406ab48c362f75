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
    /// Merge deltas (LoRA, IA3, BitFit, LayerNorm tuning, fine-tuning) into the base weights and
    /// write a plain HF model directory.
    Merge(MergeArgs),
    /// Export a delta to PEFT's adapter format (LoRA, IA3).
    Export(ExportArgs),
    /// Benchmarks, side by side with PyTorch when --torch-python is given.
    Bench(BenchArgs),
}

#[derive(Args, Debug, Clone, Default)]
pub struct DeltaArgs {
    /// A delta to attach: a spec such as `lora:r=8,lora_alpha=16,target=query+value,layers=0-2`
    /// (repeatable; see `deltatune inspect --help`), or a directory holding a saved delta of ours
    /// or a PEFT adapter.
    #[arg(long = "delta")]
    pub delta: Vec<String>,
    /// A JSON file with delta specs (an object, a list, or {"deltas": [...]}).
    #[arg(long)]
    pub delta_config: Option<PathBuf>,
    /// Seed for initialising new deltas.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
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
    #[command(flatten)]
    pub deltas: DeltaArgs,
    /// Print which modules each delta pattern matches (and which patterns match nothing) without
    /// failing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object: model_type, total_params, trainable_params, modules.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub deltas: DeltaArgs,
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

#[derive(Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub deltas: DeltaArgs,
    /// Output directory (a plain HF model directory).
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The saved delta directory to export.
    #[arg(long)]
    pub delta: PathBuf,
    /// Which delta group to export, if the directory holds several.
    #[arg(long)]
    pub name: Option<String>,
    /// Output format.
    #[arg(long, default_value = "peft")]
    pub format: String,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// `base_model_name_or_path` written into the PEFT config.
    #[arg(long, default_value = "sentence-transformers/all-MiniLM-L6-v2")]
    pub base_model_name: String,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Eval-mode forward throughput (sentences/s) at batch x seq-len, every token real.
    Forward(BenchForwardArgs),
    /// Training step time, forward time and peak memory per method, with ratios against the
    /// PyTorch + PEFT baseline (../shared/baselines/peft_bench.py) run in the same invocation.
    Train(BenchTrainArgs),
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Methods, comma-separated (lora, full, ia3, adapter, prefix, prompt).
    #[arg(long, default_value = "lora,full,ia3,adapter,prefix")]
    pub methods: String,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub bench_threads: usize,
    /// A Python with torch, transformers and peft for the baseline.
    #[arg(long, env = "DELTATUNE_TORCH_PYTHON")]
    pub torch_python: Option<PathBuf>,
    /// The baseline script.
    #[arg(long, default_value = "../shared/baselines/peft_bench.py")]
    pub peft_script: PathBuf,
    /// Internal: measure one method in this process and print its JSON.
    #[arg(long, hide = true)]
    pub single: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// A Python with torch + transformers (e.g. a throwaway venv's bin/python) to run the
    /// PyTorch side in the same run.
    #[arg(long, env = "DELTATUNE_TORCH_PYTHON")]
    pub torch_python: Option<PathBuf>,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    pub bench_threads: usize,
    #[arg(long)]
    pub json: bool,
}
