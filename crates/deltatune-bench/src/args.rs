//! Command-line arguments of `deltatune bench` (the CLI mounts them as its `bench` subcommand).

use clap::{Args, Subcommand};
use std::path::PathBuf;

/// The backbone to benchmark.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local HF model directory (config.json, model.safetensors, tokenizer.json).
    /// Default: the default model (all-MiniLM-L6-v2), fetched on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
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
    /// SST-2 accuracy on the PEFT baseline's protocol, deltatune and PyTorch + PEFT side by side.
    Accuracy(BenchAccuracyArgs),
    /// Seconds per epoch of LoRA on the top 1, 2, 3 layers with frozen-prefix caching, against
    /// PyTorch + PEFT (layers_to_transform) in the same run.
    Cache(BenchCacheArgs),
    /// The machine's single-precision peak (FMA microbenchmark) and the fraction of it the
    /// encoder's matmuls reach.
    Matmul(BenchMatmulArgs),
    /// Inference with a merged LoRA against the bare backbone.
    Merged(BenchForwardArgs),
    /// The decoder (default: SmolLM2-135M Q4_1 GGUF): greedy tokens/s without and with deltas,
    /// and LoRA training step time and peak memory at batch x seq-len, each against PyTorch +
    /// PEFT on the dequantized f32 model (bench/torch_decoder.py) in the same run.
    Decoder(BenchDecoderArgs),
    /// `deltatune serve` under load on loopback (our own load generator, bounded in requests and
    /// time): decoder tokens/s, latency and time to first token by concurrent clients and by the
    /// number of LoRA deltas the load is spread over; encoder requests/s over 1 and 16 deltas.
    Serve(BenchServeArgs),
}

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// A decoder (`.gguf`) for the generation part (default: the default decoder).
    #[arg(long)]
    pub decoder: Option<PathBuf>,
    /// An encoder directory for the embeddings part (default: the default model).
    #[arg(long)]
    pub encoder: Option<PathBuf>,
    /// Concurrent clients for the decoder runs.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub clients: Vec<usize>,
    /// Numbers of LoRA deltas the 8-client load is spread over.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub deltas: Vec<usize>,
    /// Requests each client sends per run.
    #[arg(long, default_value_t = 3)]
    pub requests: usize,
    /// max_tokens per generation.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Concurrent clients for the encoder runs.
    #[arg(long, default_value_t = 32)]
    pub encoder_clients: usize,
    /// Stop a run after this many seconds (whatever finished counts).
    #[arg(long, default_value_t = 120.0)]
    pub max_seconds: f64,
    #[arg(long, default_value_t = 2)]
    pub bench_threads: usize,
    /// Skip the decoder part.
    #[arg(long)]
    pub no_decoder: bool,
    /// Skip the encoder part.
    #[arg(long)]
    pub no_encoder: bool,
    /// Also run the decoder load against llama.cpp's server (llama-cpp-python with its `server`
    /// extra) started by this Python on the same GGUF, with the same threads, prompts and clients.
    #[arg(long, value_name = "PYTHON")]
    pub llama_cpp_python: Option<PathBuf>,
    /// Instead of the benchmark grid: a soak run of this many requests (about a third of them
    /// invalid) against the backbone chosen by --soak-backbone, with deltas unloaded and loaded
    /// again every --churn-seconds; every valid answer is checked against the same request alone.
    #[arg(long, value_name = "REQUESTS")]
    pub soak: Option<usize>,
    /// The backbone of the soak run.
    #[arg(long, value_enum, default_value = "encoder")]
    pub soak_backbone: SoakBackbone,
    /// Seconds between two delta unload/load operations in the soak run.
    #[arg(long, default_value_t = 2.0)]
    pub churn_seconds: f64,
    /// Concurrent clients of the soak run.
    #[arg(long, default_value_t = 16)]
    pub soak_clients: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoakBackbone {
    Encoder,
    Decoder,
}

#[derive(Args, Debug)]
pub struct BenchDecoderArgs {
    /// A `.gguf` file (default: the default decoder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The delta trained in the step benchmark (the PyTorch side always runs LoRA r 8 on q_proj
    /// and v_proj).
    #[arg(long, default_value = "lora:r=8,lora_alpha=16,target=q_proj+v_proj")]
    pub delta: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// New tokens per generation run.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Generation runs per variant (median).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 2)]
    pub bench_threads: usize,
    /// A Python with torch, transformers, gguf and peft for the baseline.
    #[arg(long, env = "DELTATUNE_TORCH_PYTHON")]
    pub torch_python: Option<PathBuf>,
    /// A Python with llama-cpp-python: also measure llama.cpp's decode and prompt-processing
    /// tokens/s on the same GGUF, without and with a LoRA exported by deltatune as an adapter GGUF.
    #[arg(long, value_name = "PYTHON")]
    pub llama_cpp_python: Option<PathBuf>,
    /// Skip the training-step part.
    #[arg(long)]
    pub no_train: bool,
    /// Skip the generation part.
    #[arg(long)]
    pub no_generate: bool,
    /// Internal: measure our training step in this process and print its JSON.
    #[arg(long, hide = true)]
    pub single: bool,
    /// Also time the training step on 1 thread (when --bench-threads is more), to show the
    /// scaling.
    #[arg(long)]
    pub scaling: bool,
    /// Also time the training step split over this many ranks inside the process (as `train-lm
    /// --data-parallel N`); 1: not timed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub ranks: u32,
    /// Also print where our training step's time goes (phases and fused ops).
    #[arg(long)]
    pub profile: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchMatmulArgs {
    /// Rows of the encoder matmuls (batch x sequence length).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub bench_threads: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchCacheArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Top layers to put LoRA on, comma-separated.
    #[arg(long, default_value = "1,2,3")]
    pub top_layers: String,
    #[arg(long, default_value = "../shared/data/glue/sst2")]
    pub sst2: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 2)]
    pub bench_threads: usize,
    #[arg(long, env = "DELTATUNE_TORCH_PYTHON")]
    pub torch_python: Option<PathBuf>,
    /// A Python with llama-cpp-python: also measure llama.cpp's decode and prompt-processing
    /// tokens/s on the same GGUF, without and with a LoRA exported by deltatune as an adapter GGUF.
    #[arg(long, value_name = "PYTHON")]
    pub llama_cpp_python: Option<PathBuf>,
    #[arg(long, default_value = "runs/bench-cache")]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchAccuracyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Methods, comma-separated (lora, full, ia3, prefix, prompt).
    #[arg(long, default_value = "lora,full")]
    pub methods: String,
    /// Seeds, comma-separated; each method runs once per seed on each side.
    #[arg(long, default_value = "42,43,44")]
    pub seeds: String,
    /// Directory of SST-2 (train.tsv, dev.tsv).
    #[arg(long, default_value = "../shared/data/glue/sst2")]
    pub sst2: PathBuf,
    #[arg(long, default_value_t = 8000)]
    pub train_limit: usize,
    #[arg(long, default_value_t = 2)]
    pub bench_threads: usize,
    #[arg(long, env = "DELTATUNE_TORCH_PYTHON")]
    pub torch_python: Option<PathBuf>,
    /// A Python with llama-cpp-python: also measure llama.cpp's decode and prompt-processing
    /// tokens/s on the same GGUF, without and with a LoRA exported by deltatune as an adapter GGUF.
    #[arg(long, value_name = "PYTHON")]
    pub llama_cpp_python: Option<PathBuf>,
    #[arg(long, default_value = "../shared/baselines/peft_bench.py")]
    pub peft_script: PathBuf,
    /// Where our runs go.
    #[arg(long, default_value = "runs/bench-accuracy")]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Methods, comma-separated (lora, lora-dropout, dora, dora-dropout, vera, full, ia3, adapter, prefix, prompt, bitfit, loha, lokr, oft, adalora).
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
    /// A Python with llama-cpp-python: also measure llama.cpp's decode and prompt-processing
    /// tokens/s on the same GGUF, without and with a LoRA exported by deltatune as an adapter GGUF.
    #[arg(long, value_name = "PYTHON")]
    pub llama_cpp_python: Option<PathBuf>,
    /// The baseline script.
    #[arg(long, default_value = "../shared/baselines/peft_bench.py")]
    pub peft_script: PathBuf,
    /// Internal: measure one method in this process and print its JSON.
    #[arg(long, hide = true)]
    pub single: bool,
    /// Also print where a step's time goes: each fused op's forward and backward, and the
    /// forward / backward / optimizer phases (over --steps extra steps).
    #[arg(long)]
    pub profile: bool,
    /// Also time each method on 1 thread (when --bench-threads is more), to show the scaling.
    #[arg(long)]
    pub scaling: bool,
    /// Also time each step split over this many ranks inside the process (as `train
    /// --data-parallel N`): each rank computes its rows of the batch on its share of the threads
    /// (single-threaded kernels over whole matrices), the gradients are summed in rank order and
    /// one optimizer step follows. 1: not timed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub ranks: u32,
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
    /// A Python with llama-cpp-python: also measure llama.cpp's decode and prompt-processing
    /// tokens/s on the same GGUF, without and with a LoRA exported by deltatune as an adapter GGUF.
    #[arg(long, value_name = "PYTHON")]
    pub llama_cpp_python: Option<PathBuf>,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    pub bench_threads: usize,
    #[arg(long)]
    pub json: bool,
}

