//! The one table of benchmark methods: the delta specs each method attaches, the learning rate
//! of the PEFT baseline protocol (peft_bench.py's DEFAULT_LR), and whether the PyTorch + PEFT
//! baseline has the method. Every benchmark reads it; nothing else lists methods or rates.

use anyhow::Result;
use deltatune::delta::DeltaSpec;

/// One encoder benchmark method.
#[derive(Clone, Copy, Debug)]
pub struct BenchMethod {
    pub name: &'static str,
    /// `--delta` specs, attached together.
    pub specs: &'static [&'static str],
    /// Learning rate of the baseline protocol.
    pub lr: f64,
    /// Whether ../shared/baselines/peft_bench.py runs it too.
    pub in_peft_baseline: bool,
}

pub const METHODS: &[BenchMethod] = &[
    BenchMethod { name: "lora", specs: &["lora:r=8,lora_alpha=16,target=query+value"], lr: 5e-4, in_peft_baseline: true },
    BenchMethod { name: "dora", specs: &["dora:r=8,lora_alpha=16,target=query+value"], lr: 5e-4, in_peft_baseline: false },
    // LoRA and DoRA as PEFT recipes often run them, with dropout on the update's input.
    BenchMethod { name: "lora-dropout", specs: &["lora:r=8,lora_alpha=16,lora_dropout=0.1,target=query+value"], lr: 5e-4, in_peft_baseline: false },
    BenchMethod { name: "dora-dropout", specs: &["dora:r=8,lora_alpha=16,lora_dropout=0.05,target=query+value"], lr: 5e-4, in_peft_baseline: false },
    BenchMethod { name: "vera", specs: &["vera:r=256,target=query+value"], lr: 1e-2, in_peft_baseline: false },
    BenchMethod { name: "full", specs: &["full"], lr: 2e-5, in_peft_baseline: true },
    BenchMethod { name: "ia3", specs: &["ia3"], lr: 3e-3, in_peft_baseline: true },
    BenchMethod { name: "adapter", specs: &["adapter"], lr: 5e-4, in_peft_baseline: false },
    BenchMethod { name: "prefix", specs: &["prefix:num_virtual_tokens=10"], lr: 1e-2, in_peft_baseline: true },
    BenchMethod { name: "prompt", specs: &["prompt:num_virtual_tokens=10"], lr: 3e-2, in_peft_baseline: true },
    // Not in peft_bench.py's DEFAULT_LR: rates as experiments/methods.py uses them.
    BenchMethod { name: "bitfit", specs: &["bitfit"], lr: 3e-3, in_peft_baseline: false },
    BenchMethod { name: "loha", specs: &["loha"], lr: 1e-3, in_peft_baseline: false },
    BenchMethod { name: "lokr", specs: &["lokr"], lr: 3e-3, in_peft_baseline: false },
    BenchMethod { name: "oft", specs: &["oft"], lr: 1e-3, in_peft_baseline: false },
    // The rank allocator runs over the benchmark's own run length (total_step from the run).
    BenchMethod { name: "adalora", specs: &["adalora:init_r=12,target_r=8,lora_alpha=16"], lr: 1e-3, in_peft_baseline: false },
];

/// Generation variants of `bench decoder`: a label and the delta spec (none for the bare model).
pub const DECODER_VARIANTS: &[(&str, Option<&str>)] =
    &[("none", None), ("lora", Some("lora:r=8,lora_alpha=16,target=q_proj+v_proj")), ("ia3", Some("ia3")), ("prefix", Some("prefix:num_virtual_tokens=10"))];

/// The method called `name`.
pub fn find(name: &str) -> Result<&'static BenchMethod> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        anyhow::anyhow!("invalid --methods: `{name}` (expected {})", names.join(", "))
    })
}

impl BenchMethod {
    /// The parsed delta specs.
    pub fn specs(&self) -> Result<Vec<DeltaSpec>> {
        Ok(self.specs.iter().map(|s| DeltaSpec::parse_cli(s)).collect::<deltatune::Result<_>>()?)
    }
}
