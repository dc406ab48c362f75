//! Command-line flags (clap derive). Typed values (delta specs, pooling, schedules, budgets,
//! dtypes, splits, formats) are parsed here, once, by clap value parsers into library types;
//! `commands/` maps the parsed flags onto the library's job specs.

use clap::{Args, Parser, Subcommand};
use deltatune::api::{DeltaSource, ExportFormat, Split};
use deltatune::data::readers::Format;
use deltatune::delta::DeltaSpec;
use deltatune::search::run::Budget;
use deltatune::train::optim::Decay;
use deltatune::Pooling;
use deltatune_bench::BenchArgs;
use std::path::PathBuf;

fn delta_source(s: &str) -> deltatune::Result<DeltaSource> {
    DeltaSource::parse(s)
}

fn delta_spec(s: &str) -> deltatune::Result<DeltaSpec> {
    DeltaSpec::parse_cli(s)
}

/// What `merge` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeFormat {
    /// A plain HF model directory.
    Hf,
    /// A GGUF model file.
    Gguf,
}

fn merge_format(s: &str) -> deltatune::Result<MergeFormat> {
    match s {
        "hf" => Ok(MergeFormat::Hf),
        "gguf" => Ok(MergeFormat::Gguf),
        other => Err(deltatune::Error::arg("--format", format!("`{other}` (supported: hf, gguf)"))),
    }
}

/// `label=words,label=words` (e.g. `0= negative,1= positive`).
fn verbalizer(s: &str) -> deltatune::Result<Vec<(String, String)>> {
    s.split(',')
        .map(|item| {
            item.split_once('=')
                .map(|(l, w)| (l.to_string(), w.to_string()))
                .ok_or_else(|| deltatune::Error::arg("--verbalizer", format!("`{item}` is not label=words")))
        })
        .collect()
}

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
    /// Train deltas (and a task head) on a real task; prints the dev score.
    Train(TrainArgs),
    /// Score a trained delta on a task split.
    Eval(EvalArgs),
    /// Predict labels for new texts with a trained delta (JSONL out).
    Predict(PredictArgs),
    /// Render a run's loss and dev-metric curves (PNG and SVG).
    Plot(PlotArgs),
    /// S3Delta: search where to put which delta under a trainable-parameter budget.
    Search(SearchArgs),
    /// Print a model's module tree (with attached deltas) and parameter counts.
    Inspect(InspectArgs),
    /// Embed lines of text (mean-pooled sentence embeddings, one JSON array per line).
    Embed(EmbedArgs),
    /// Merge deltas (LoRA, IA3, BitFit, LayerNorm tuning, fine-tuning) into the base weights and
    /// write a plain HF model directory.
    Merge(MergeArgs),
    /// Export a delta to PEFT's adapter format (LoRA, DoRA, VeRA, AdaLoRA, LoHa, LoKr, OFT, IA3) or a LoRA as a llama.cpp adapter GGUF.
    Export(ExportArgs),
    /// Benchmarks, side by side with PyTorch when --torch-python is given.
    Bench(BenchArgs),
    /// Generate text with a decoder LM (GGUF or HF directory), streaming to stdout.
    Generate(GenerateArgs),
    /// Train deltas on a decoder LM (causal-LM loss on completions): a classification task as
    /// text-to-text with a verbalizer, or JSONL prompt/completion pairs.
    TrainLm(TrainLmArgs),
    /// Serve one backbone and many deltas over HTTP (OpenAI-compatible; mixed-delta batching).
    Serve(ServeArgs),
}

/// `NAME=PATH` for `--delta` of `serve`.
fn named_delta(s: &str) -> deltatune::Result<(String, PathBuf)> {
    let (n, p) = s.split_once('=').ok_or_else(|| deltatune::Error::arg("--delta", format!("`{s}` is not NAME=PATH")))?;
    if n.is_empty() || p.is_empty() {
        return Err(deltatune::Error::arg("--delta", format!("`{s}` is not NAME=PATH")));
    }
    Ok((n.to_string(), PathBuf::from(p)))
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Backbone: an encoder directory, or a decoder (GGUF file or HF directory). Default: the
    /// default encoder, or the default decoder with --decoder.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Serve the default decoder (SmolLM2) when --model is not given.
    #[arg(long)]
    pub decoder: bool,
    /// A saved delta (ours or a PEFT adapter folder) served as NAME; repeatable.
    #[arg(long = "delta", value_name = "NAME=PATH", value_parser = named_delta)]
    pub delta: Vec<(String, PathBuf)>,
    /// Serve every subfolder (named after it); admin loads are confined to this folder.
    #[arg(long)]
    pub delta_dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Bearer token required on every route but /health and the page.
    #[arg(long, env = "DELTATUNE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Enable POST /admin/deltas and DELETE /admin/deltas/{name}.
    #[arg(long)]
    pub allow_admin: bool,
    /// Requests that may wait; beyond, 429 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub queue_size: u64,
    /// Rows in one batched pass.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_batch: u64,
    /// HTTP requests handled at once; beyond, 429 at once.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_concurrent: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Longest encoder input in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_input_tokens: usize,
    /// Per-request time limit in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Dequantize the decoder's frozen weights for every matmul (slower, bit-for-bit with f32).
    #[arg(long)]
    pub exact: bool,
}

#[derive(Args, Debug)]
pub struct TrainLmArgs {
    /// A `.gguf` file, a directory with one, or an HF Llama-family directory. Default: the
    /// default decoder (SmolLM2-135M-Instruct, Q4_1 GGUF).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A named classification task from --data-dir (sst2, cola, rte, mr, cr, trec have default
    /// templates and verbalizers), scored by accuracy before and after training.
    #[arg(long, conflicts_with = "train")]
    pub task: Option<String>,
    #[arg(long, env = "DELTATUNE_DATA", default_value = "../shared/data")]
    pub data_dir: PathBuf,
    /// JSONL of {"prompt", "completion"} pairs, {"text"} lines or (with --chat) {"messages"}
    /// conversations to train on; scored by perplexity.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// JSONL pairs for the perplexity evaluation of --train (default: the training pairs).
    #[arg(long, requires = "train")]
    pub dev: Option<PathBuf>,
    /// Prompt template for --task, with {text} (and {text_b}).
    #[arg(long, requires = "task")]
    pub template: Option<String>,
    /// Label words for --task: `label=words,...` (e.g. `0= negative,1= positive`).
    #[arg(long, requires = "task", value_parser = verbalizer)]
    pub verbalizer: Option<Vec<(String, String)>>,
    /// Deltas to attach (default: `lora:r=8,lora_alpha=16,target=q_proj+v_proj`).
    #[arg(long = "delta", value_parser = delta_spec)]
    pub delta: Vec<DeltaSpec>,
    /// A JSON file with delta specs (an object, a list, or {"deltas": [...]}), e.g. the
    /// structure.json of `deltatune search --lm`; added to any --delta.
    #[arg(long)]
    pub delta_config: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    #[arg(long)]
    pub max_train: Option<usize>,
    #[arg(long)]
    pub max_dev: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Apply the chat template the model carries: each prompt becomes the user's message and each
    /// completion the assistant's reply, closed by the end-of-turn token; --train files may then
    /// hold {"messages": [{"role", "content"}, ...]} conversations (the last, assistant turn is
    /// the target). With --task the label words are the reply.
    #[arg(long)]
    pub chat: bool,
    /// Pack examples (separated by the end-of-sequence token) into full --max-length rows
    /// instead of padding each example to the longest in its batch.
    #[arg(long)]
    pub pack: bool,
    /// Where to save the trained deltas and metrics.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace the output if it exists and is not empty.
    #[arg(long)]
    pub overwrite: bool,
    /// Skip scoring the untuned model.
    #[arg(long)]
    pub no_baseline: bool,
    /// Train as N data-parallel ranks inside this process (threads), each on its shard of every
    /// batch with an equal share of --threads; the one-process result. Not under mpirun.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub data_parallel: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A `.gguf` file, a directory with one, or an HF Llama-family directory. Default: the
    /// default decoder (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt, used as is (special tokens such as `<|im_start|>` are recognised).
    #[arg(long, required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// A user message, wrapped in the chat template the model carries.
    #[arg(long, conflicts_with = "prompt")]
    pub chat: Option<String>,
    /// A system message for --chat (default: the template's own, if any).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 = no top-k cut.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Multiply in f32 with dequantized weights at every step (slower; the maths of an f32 reference).
    /// Keep generating past the end-of-sequence token (always --max-new-tokens tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long)]
    pub exact: bool,
    /// A trained delta directory (ours, e.g. from `train-lm --out`, or a PEFT adapter) to apply.
    #[arg(long)]
    pub delta: Option<PathBuf>,
    /// Print one JSON object (text, tokens, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct DeltaArgs {
    /// A delta to attach: a spec such as `lora:r=8,lora_alpha=16,target=query+value,layers=0-2`
    /// (repeatable; see `deltatune inspect --help`), or a directory holding a saved delta of ours
    /// or a PEFT adapter.
    #[arg(long = "delta", value_parser = delta_source)]
    pub delta: Vec<DeltaSource>,
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
    /// Also fetch a decoder: `smollm2` (the default decoder, SmolLM2-135M-Instruct Q4_1 GGUF,
    /// about 98 MB; also what a bare `--decoder` means) or `gemma3` (Gemma 3 270M Q4_K_M GGUF,
    /// about 240 MB).
    #[arg(long, num_args = 0..=1, default_missing_value = "smollm2", value_parser = ["smollm2", "gemma3"])]
    pub decoder: Option<String>,
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
    /// Replace the output if it exists and is not empty.
    #[arg(long)]
    pub overwrite: bool,
    /// Pooling over token states: mean or cls.
    #[arg(long, default_value = "mean")]
    pub pooling: Pooling,
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
    /// Output: a plain HF model directory, or with `--format gguf` a GGUF model file.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the output if it exists and is not empty.
    #[arg(long)]
    pub overwrite: bool,
    /// `hf` (a model directory) or `gguf` (a GGUF model file llama.cpp loads; the base must be a
    /// GGUF decoder).
    #[arg(long, default_value = "hf", value_parser = merge_format)]
    pub format: MergeFormat,
    /// Weight types. HF directories of decoders: f32 (default), f16 or bf16 (encoders are written
    /// as loaded). GGUF: f16 (default), q8_0, or base (the base file's own types; merged matrices
    /// re-quantized).
    #[arg(long)]
    pub dtype: Option<String>,
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
    /// Output format: `peft` (an adapter folder) or `gguf` (a llama.cpp LoRA adapter file; the
    /// model is a decoder, the default decoder without --model).
    #[arg(long, default_value = "peft")]
    pub format: ExportFormat,
    /// Output directory (`peft`) or file (`gguf`).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the output if it exists and is not empty.
    #[arg(long)]
    pub overwrite: bool,
    /// `base_model_name_or_path` written into the PEFT config.
    #[arg(long, default_value = "sentence-transformers/all-MiniLM-L6-v2")]
    pub base_model_name: String,
}

#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// A named task: sst2, cola, mrpc, rte, stsb, cb, superglue-rte, trec, mr, cr, subj, mpqa,
    /// sst5 (read from --data-dir), or bbc-news (the demo set, fetched on first use).
    #[arg(long)]
    pub task: Option<String>,
    /// Root of the named tasks' files.
    #[arg(long, env = "DELTATUNE_DATA", default_value = "../shared/data")]
    pub data_dir: PathBuf,
    /// A folder per class (one text file per example), or a CSV/TSV/JSONL training file.
    #[arg(long, conflicts_with = "task")]
    pub data: Option<PathBuf>,
    /// A CSV/TSV/JSONL training file (same as --data with a file).
    #[arg(long, conflicts_with_all = ["task", "data"])]
    pub train: Option<PathBuf>,
    /// A labelled dev file for --data/--train files (default: a seeded share of train).
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// Column (CSV/TSV header name or 0-based index) or JSON key of the text.
    #[arg(long, default_value = "text")]
    pub text_col: String,
    /// Column of the second text of a pair.
    #[arg(long)]
    pub text_pair_col: Option<String>,
    /// Column of the label.
    #[arg(long, default_value = "label")]
    pub label_col: String,
    /// File format when the extension does not tell: csv, tsv, jsonl.
    #[arg(long)]
    pub format: Option<Format>,
    /// Labels are numbers to regress on (default: class names).
    #[arg(long)]
    pub regression: bool,
    /// Use only the first N training examples.
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Use only the first N dev examples.
    #[arg(long)]
    pub max_dev: Option<usize>,
    /// Share of train held out as dev when the data has no dev split.
    #[arg(long, default_value_t = 0.1)]
    pub dev_fraction: f32,
    /// Seed of held-out splits (fixed across training seeds so runs share one dev set).
    #[arg(long, default_value_t = 42)]
    pub split_seed: u64,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub deltas: DeltaArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 0.06)]
    pub warmup_ratio: f64,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// linear, cosine or constant (after warm-up).
    #[arg(long, default_value = "linear")]
    pub schedule: Decay,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Decay every tensor (default: not biases and LayerNorm weights).
    #[arg(long)]
    pub decay_all: bool,
    /// Clip the global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Truncate sequences to this many tokens.
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    /// Evaluate every N steps (default: every epoch).
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub eval_batch_size: usize,
    /// Stop after N evaluations without improvement.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Plain shuffled batches instead of length buckets.
    #[arg(long)]
    pub no_bucket: bool,
    /// No dropout in the backbone.
    #[arg(long)]
    pub no_dropout: bool,
    /// Write a checkpoint every N steps (and after every evaluation).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// mean or cls.
    #[arg(long, default_value = "mean")]
    pub pooling: Pooling,
    /// Compute the layers below the lowest delta once and train from the cached activations
    /// (those layers then run without dropout).
    #[arg(long)]
    pub cache_frozen: bool,
    /// Run the layers below the lowest delta without dropout (what --cache-frozen implies),
    /// without caching.
    #[arg(long)]
    pub no_frozen_dropout: bool,
    /// Memory cap of the frozen cache in MiB (the rest spills to the run directory; 0 keeps it all on disk).
    #[arg(long, default_value_t = 2048)]
    pub cache_mb: usize,
    /// Run directory (default: runs/<task>-<method>-s<seed>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Train as N data-parallel ranks inside this process, each on its shard of every batch with
    /// an equal share of --threads (the one-process result; usually faster than N times the
    /// threads on one batch). Not under mpirun.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub data_parallel: u32,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace the run in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Print one JSON object: task, method, metric, score, trainable_params, total_params, seconds, steps.
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A trained delta (a run directory, or its best/ or final/).
    #[arg(long)]
    pub delta: PathBuf,
    /// Data (default: the data the delta was trained on).
    #[command(flatten)]
    pub data: DataArgs,
    /// dev, test or train.
    #[arg(long, default_value = "dev")]
    pub split: Split,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A trained delta (a run directory, or its best/ or final/).
    #[arg(long)]
    pub delta: PathBuf,
    /// Texts: one per line (.txt), or a CSV/TSV/JSONL file with --text-col.
    #[arg(long, short)]
    pub input: PathBuf,
    #[arg(long, default_value = "text")]
    pub text_col: String,
    #[arg(long)]
    pub text_pair_col: Option<String>,
    /// Output JSONL (default: standard output).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Replace the output if it exists and is not empty.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// The run directory (holding metrics.jsonl).
    #[arg(required_unless_present = "series", conflicts_with = "series")]
    pub run_dir: Option<PathBuf>,
    /// Instead of a run: a JSON file of curves to draw together (`{"panels": [{"title", "x_label",
    /// "y_label", "series": [{"name", "points": [[x, y], ...]}]}]}`), e.g. the dev score of several
    /// methods against training steps; written to --out as PNG and SVG.
    #[arg(long, requires = "out")]
    pub series: Option<PathBuf>,
    /// Output path without extension for --series (`.png` and `.svg` are added).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace existing --out files.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Search on a decoder LM, the task as text-to-text (its template and label words, as
    /// `train-lm` uses them): the default decoder unless --model names one. A --model that is a
    /// GGUF file or a decoder directory selects this by itself. Retrain the structure with
    /// `train-lm --delta-config OUT/structure.json`.
    #[arg(long)]
    pub lm: bool,
    #[command(flatten)]
    pub data: DataArgs,
    /// Trainable-parameter budget of the deltas: a share of the backbone (`0.0139%`) or a count
    /// (`3157`). The task head is outside the budget.
    #[arg(long)]
    pub budget: Budget,
    /// Search space: L (rank-1 LoRA on every attention and FFN linear), M (L + BitFit + LN-fit +
    /// low-rank adapters), or a JSON file of delta specs.
    #[arg(long, default_value = "M")]
    pub space: String,
    /// Output directory (structure.json, candidates.tsv, heatmap.png/svg, search.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the output files if --out already holds a search.
    #[arg(long)]
    pub overwrite: bool,
    /// Passes over the training set (each step: one weight step on the weight half, one gate step on
    /// the gate half).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Run exactly N steps instead of --epochs passes.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per step on each half.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Learning rate of the delta weights and head.
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Learning rate of the architecture parameters.
    #[arg(long, default_value_t = 0.1)]
    pub alpha_lr: f64,
    /// Temperature of the shifted sigmoid.
    #[arg(long, default_value_t = 1.0)]
    pub beta: f64,
    /// Temperature of the relaxed-Bernoulli gate samples.
    #[arg(long, default_value_t = 1.0)]
    pub tau: f64,
    /// Do not renormalise p (the reference's shift_detach).
    #[arg(long)]
    pub no_renormalize: bool,
    /// DARTS-style second-order (unrolled) gate gradient instead of the first-order alternation.
    #[arg(long)]
    pub second_order: bool,
    /// Only list the space's candidates (candidates.json/tsv) and stop.
    #[arg(long)]
    pub candidates_only: bool,
    /// Seed of the 50/50 split, delta initialisation, gate noise and batch order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Truncate inputs to N tokens.
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    /// Supernet dev evaluation every N steps (and at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Pooling over token states for the head: mean or cls.
    #[arg(long, default_value = "mean")]
    pub pooling: Pooling,
    /// Turn the backbone's dropout off during the search.
    #[arg(long)]
    pub no_dropout: bool,
    /// Print one JSON object (the search.json summary) on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar or per-epoch lines.
    #[arg(long)]
    pub quiet: bool,
}
