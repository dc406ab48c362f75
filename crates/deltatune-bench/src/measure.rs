//! Benchmark building blocks: the synthetic batch of the standard protocol, timing helpers, and
//! the measured step of one method (run in its own process by [`crate::run`]).

use deltatune::data::tokenize::EncodedBatch;
use deltatune::error::Result;
use deltatune::ops::DropoutKey;
use candle_core::{Device, Tensor};
use std::time::Instant;

/// A batch where every token is real: `[CLS]`, ids uniform in [1000, 30000), `[SEP]`.
pub fn synthetic_batch(batch: usize, seq_len: usize, seed: u64, device: &Device) -> Result<EncodedBatch> {
    let key = DropoutKey(seed).derive("synthetic-batch");
    let mut ids = Vec::with_capacity(batch * seq_len);
    for i in 0..batch * seq_len {
        let pos = i % seq_len;
        ids.push(match pos {
            0 => 101,
            p if p + 1 == seq_len => 102,
            _ => 1000 + (key.uniform(i as u64) * 29000.0) as u32,
        });
    }
    let input_ids = Tensor::from_vec(ids, (batch, seq_len), device)?;
    Ok(EncodedBatch {
        token_type_ids: input_ids.zeros_like()?,
        attention_mask: Tensor::ones((batch, seq_len), candle_core::DType::F32, device)?,
        input_ids,
        lengths: vec![seq_len; batch],
    })
}

/// Runs `f` `warmup` times untimed, then `iters` times timed; returns milliseconds per run.
pub fn time_runs(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// Median of a non-empty sample (0 for an empty one).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident memory of this process in MiB (Linux `ru_maxrss`).
pub fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0 {
            u.ru_maxrss as f64 / 1024.0
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_batch() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let b = synthetic_batch(2, 5, 42, &Device::Cpu).unwrap();
        let ids = b.input_ids.to_vec2::<u32>().unwrap();
        assert_eq!(ids[0][0], 101);
        assert_eq!(ids[1][4], 102);
        assert!(ids[0][1..4].iter().all(|&x| (1000..30000).contains(&x)));
    }

    /// A step's share of the peak from its GFLOP and median time; none without them.
    #[test]
    fn fraction_of_peak_from_step_figures() {
        let mut v = serde_json::json!({"step_gflop": 190.0, "step_ms_median": 1000.0});
        super::set_fraction_of_peak(&mut v, 250.0);
        assert!((v["gflops"].as_f64().unwrap() - 190.0).abs() < 1e-9);
        assert!((v["fraction_of_peak"].as_f64().unwrap() - 0.76).abs() < 1e-9);
        // A measurement without figures gets none.
        let mut none = serde_json::json!({"step_ms_median": null});
        super::set_fraction_of_peak(&mut none, 250.0);
        assert!(none.get("fraction_of_peak").is_none());
    }

    /// The FLOP count of a MiniLM step (6 layers, h 384, intermediate 1536) at 32 × 128 tokens,
    /// against the hand count: forward 6 × (2·4096·(4·384² + 2·384·1536) + 4·32·128²·384).
    #[test]
    fn encoder_flops_from_the_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let cfg = r#"{"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                      "num_attention_heads": 12, "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}"#;
        std::fs::write(&path, cfg).unwrap();
        let c = deltatune::backbone::config::BertConfig::from_file(&path).unwrap();
        let fwd_layer = 2.0 * 4096.0 * (4.0 * 384.0 * 384.0 + 2.0 * 384.0 * 1536.0);
        let attn = 4.0 * 32.0 * 128.0 * 128.0 * 384.0;
        // Nothing trained, nothing below: forward only.
        assert_eq!(encoder_step_flops(&c, 32, 128, 6, 0, false), 6.0 * (fwd_layer + attn));
        // LoRA everywhere (73,728 + a 770 head): backward through every layer, 6 per parameter-token.
        let lora = encoder_step_flops(&c, 32, 128, 0, 74_498, false);
        assert_eq!(lora, 6.0 * (fwd_layer + attn) + 6.0 * (fwd_layer + 2.0 * attn) + 6.0 * 4096.0 * 74_498.0);
        assert!((lora / 1e9 - 190.3).abs() < 0.1, "{}", lora / 1e9);
        // Full fine-tuning adds the weight gradients of every linear map.
        assert_eq!(encoder_step_flops(&c, 32, 128, 0, 22_713_216, true) - lora, 6.0 * fwd_layer - 6.0 * 4096.0 * 74_498.0);
    }
}

/// Results of the training-step benchmark for one method (milliseconds, MiB).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainBench {
    pub method: String,
    pub step_ms_median: f64,
    pub fwd_ms_median: f64,
    pub infer_ms_median: f64,
    pub peak_rss_mb: f64,
    pub trainable_params: usize,
    pub total_params: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Floating-point operations of one step (matmuls and attention, counted from the shapes;
    /// see [`encoder_step_flops`]), in GFLOP.
    #[serde(default)]
    pub step_gflop: f64,
    /// Threads the step ran on.
    #[serde(default)]
    pub threads: usize,
    /// Ranks the batch was split over inside the process (1: the whole batch at once).
    #[serde(default)]
    pub ranks: usize,
    /// With profiling: per-step milliseconds of each fused op's forward and backward, and of the
    /// phases (forward, backward, optimizer) over `steps` extra steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
}

/// Where a training step's time goes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepProfile {
    pub steps: usize,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// (op, phase, ms per step, calls per step), largest first.
    pub ops: Vec<(String, String, f64, f64)>,
}

/// A training step's batch split over ranks inside the process, as `train --data-parallel N`
/// does: each rank in a rayon pool of its own with its share of the threads computes a contiguous
/// shard of the rows; the gradients are summed in rank order.
pub struct Ranks {
    batch: usize,
    pools: Vec<rayon::ThreadPool>,
}

/// One rank's part of a step: (loss weighted by the rank's share, forward seconds, gradients).
pub type Part = (f64, f64, std::collections::BTreeMap<String, Tensor>);

impl Ranks {
    /// `ranks` ranks (at most one per row; 1: the whole batch on the calling pool).
    pub fn new(ranks: usize, batch: usize) -> Result<Self> {
        let n = ranks.clamp(1, batch.max(1));
        let per = (rayon::current_num_threads() / n).max(1);
        let pools = (0..if n > 1 { n } else { 0 })
            .map(|r| rayon::ThreadPoolBuilder::new().num_threads(per).thread_name(move |i| format!("rank{r}-{i}")).build())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| deltatune::Error::Distributed(format!("creating the ranks' thread pools: {e}")))?;
        Ok(Self { batch, pools })
    }

    /// Runs `part(rows)` for every rank's rows at once and sums the parts (loss and gradients; the
    /// forward time is the slowest rank's).
    pub fn step(&self, part: impl Fn(std::ops::Range<usize>) -> Result<Part> + Sync) -> Result<Part> {
        if self.pools.is_empty() {
            return part(0..self.batch);
        }
        let n = self.pools.len();
        let parts: Vec<Result<Part>> = std::thread::scope(|s| {
            let hs: Vec<_> = self
                .pools
                .iter()
                .enumerate()
                .map(|(r, pool)| {
                    let part = &part;
                    s.spawn(move || pool.install(|| part(deltatune::dist::shard(self.batch, r, n))))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        // Summed in rank order: the result does not depend on which rank finished first.
        let (mut lv, mut fwd, mut sum) = (0f64, 0f64, std::collections::BTreeMap::<String, Tensor>::new());
        for p in parts {
            let (l, f, g) = p?;
            lv += l;
            fwd = f64::max(fwd, f);
            for (k, t) in g {
                let t = match sum.remove(&k) {
                    Some(acc) => (acc + t)?,
                    None => t,
                };
                sum.insert(k, t);
            }
        }
        Ok((lv, fwd, sum))
    }

    /// How many ranks a step is split over.
    pub fn count(&self) -> usize {
        self.pools.len().max(1)
    }
}

/// Times training steps (zero grad + forward + loss + backward + AdamW) and eval forwards of one
/// method on a synthetic batch, as the PEFT baseline's `--mode bench` does.
pub fn train_step_bench(
    model_dir: &std::path::Path,
    method: &str,
    batch: usize,
    seq_len: usize,
    warmup: usize,
    steps: usize,
    profile: bool,
    ranks: usize,
) -> Result<TrainBench> {
    use deltatune::head::{Head, HeadConfig, HeadKind};
    use deltatune::train::optim::{AdamW, AdamWConfig, DecayRule, GradAccumulator};
    use deltatune::artifacts::TaskModel;
    use deltatune::{attach, Backbone, ForwardCtx, Pooling};
    let dev = Device::Cpu;
    let mut backbone = deltatune::BertModel::load(model_dir, &dev)?;
    let specs = crate::methods::find(method).and_then(|m| m.specs()).map_err(|e| deltatune::Error::arg("--methods", e.to_string()))?;
    attach::attach(&mut backbone, &specs, attach::AttachOptions { seed: 42, tokenizer: None })?;
    let head = Head::new(HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: Pooling::Mean, hidden_size: backbone.hidden_size() }, 42, &dev)?;
    let model = TaskModel { backbone, head, specs };
    let b = synthetic_batch(batch, seq_len, 42, &dev)?;
    let labels: Vec<u32> = (0..batch as u64).map(|i| (DropoutKey(7).uniform(i) * 2.0) as u32).collect();
    let labels = Tensor::from_vec(labels, batch, &dev)?;
    let params = model.params();
    let cfg = AdamWConfig { weight_decay: 0.01, decay_rule: DecayRule::All, ..Default::default() };
    let mut opt = AdamW::new(params.clone(), cfg)?;
    let lr = match method {
        "full" => 2e-5,
        "ia3" => 3e-3,
        "prefix" => 1e-2,
        "prompt" => 3e-2,
        _ => 5e-4,
    };
    // Ranks: each in a rayon pool of its own with its share of the threads, computing a
    // contiguous shard of the batch's rows (with the dropout masks those rows get in the whole
    // batch) and its loss weighted by its share, as `train --data-parallel` does.
    let ranks = Ranks::new(ranks, batch)?;
    // One rank's forward and backward on `rows` of the batch: (weighted loss, forward seconds,
    // gradients of the trainable parameters).
    let shard = |key: DropoutKey, rows: std::ops::Range<usize>| -> Result<Part> {
        let t0 = Instant::now();
        let n = rows.len();
        let part = |t: &Tensor| -> Result<Tensor> { Ok(if n == batch { t.clone() } else { t.narrow(0, rows.start, n)? }) };
        let sb = deltatune::data::tokenize::EncodedBatch {
            input_ids: part(&b.input_ids)?,
            token_type_ids: part(&b.token_type_ids)?,
            attention_mask: part(&b.attention_mask)?,
            lengths: b.lengths[rows.clone()].to_vec(),
        };
        let logits = deltatune::ops::in_batch_rows(rows.start, n, || model.logits(&sb, &ForwardCtx::train(key)))?;
        let loss = (model.head.loss(&logits, &part(&labels)?)? * (n as f64 / batch as f64))?;
        let lv = loss.to_scalar::<f32>()? as f64;
        let fwd = t0.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let mut acc = GradAccumulator::default();
        acc.add(&params, &grads)?;
        drop(grads);
        Ok((lv, fwd, acc.take(1.0)?))
    };
    let (mut step_ms, mut fwd_ms, mut losses) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        let key = DropoutKey(42).derive_n(i as u64);
        let (lv, fwd, grads) = ranks.step(|rows| shard(key, rows))?;
        opt.step(&grads, lr)?;
        let t2 = Instant::now();
        if i >= warmup {
            step_ms.push((t2 - t0).as_secs_f64() * 1e3);
            fwd_ms.push(fwd * 1e3);
        }
        losses.push(lv);
    }
    let profile = if profile {
        deltatune::ops::profile::take();
        deltatune::ops::profile::set_enabled(true);
        let (mut f, mut bw, mut o) = (0f64, 0f64, 0f64);
        for i in 0..steps {
            let t0 = Instant::now();
            let key = DropoutKey(43).derive_n(i as u64);
            let logits = model.logits(&b, &ForwardCtx::train(key))?;
            let loss = model.head.loss(&logits, &labels)?;
            loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            let mut acc = GradAccumulator::default();
            acc.add(&params, &grads)?;
            drop(grads);
            opt.step(&acc.take(1.0)?, lr)?;
            let t3 = Instant::now();
            f += (t1 - t0).as_secs_f64();
            bw += (t2 - t1).as_secs_f64();
            o += (t3 - t2).as_secs_f64();
        }
        deltatune::ops::profile::set_enabled(false);
        let n = steps.max(1) as f64;
        let mut ops: Vec<(String, String, f64, f64)> =
            deltatune::ops::profile::take().into_iter().map(|e| (e.op, e.phase, e.seconds * 1e3 / n, e.calls as f64 / n)).collect();
        ops.sort_by(|a, b| b.2.total_cmp(&a.2));
        Some(StepProfile { steps, forward_ms: f * 1e3 / n, backward_ms: bw * 1e3 / n, optimizer_ms: o * 1e3 / n, ops })
    } else {
        None
    };
    let infer = time_runs(warmup, steps, || {
        model.logits(&b, &ForwardCtx::eval())?;
        Ok(())
    })?;
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let lowest = attach::frozen_prefix_layers(&model.backbone);
    let step_gflop = encoder_step_flops(&model.backbone.config, batch, seq_len, lowest, trainable, method == "full") / 1e9;
    let pooler: usize = model.backbone.sites().iter().filter(|s| s.path().starts_with("pooler")).map(|s| s.num_params()).sum();
    let replaced: usize = if method == "full" { trainable - 770 } else { 0 };
    Ok(TrainBench {
        method: method.to_string(),
        step_ms_median: median(&step_ms),
        fwd_ms_median: median(&fwd_ms),
        infer_ms_median: median(&infer),
        peak_rss_mb: peak_rss_mb(),
        trainable_params: trainable,
        // Encoder without the pooler (unused by mean pooling) + deltas + head, like the baseline.
        total_params: model.backbone.num_params() - pooler + trainable - replaced,
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss: losses.last().copied().unwrap_or(f64::NAN),
        step_gflop,
        threads: rayon::current_num_threads(),
        ranks: ranks.count(),
        profile,
    })
}

/// Floating-point operations (2 per multiply-add) of one training step of a BERT-family encoder on
/// `batch` × `seq` tokens, counted from the shapes: the forward of every layer (the six linear
/// maps, and the two attention products QKᵀ and PV); the backward of the layers from `lowest`
/// (the lowest layer holding a delta) up — input gradients through the linears (one more
/// forward's worth) and through the attention products (two each); and the trainable
/// parameters: 6 per parameter and token for deltas (forward, input and weight gradients), or for
/// full fine-tuning the weight gradients of every linear map (one more forward's worth; the
/// embeddings' gradients are scatters). Embeddings, norms, activations, softmax, the head's
/// pooling and the optimizer are left out (each well under 1% here).
pub fn encoder_step_flops(c: &deltatune::backbone::config::BertConfig, batch: usize, seq: usize, lowest: usize, trainable: usize, full: bool) -> f64 {
    let (h, i, layers) = (c.hidden_size as f64, c.intermediate_size as f64, c.num_hidden_layers);
    let tokens = (batch * seq) as f64;
    let linear = 2.0 * tokens * (4.0 * h * h + 2.0 * h * i);
    let attention = 2.0 * 2.0 * batch as f64 * (seq * seq) as f64 * h;
    let forward = layers as f64 * (linear + attention);
    let backward = layers.saturating_sub(lowest) as f64 * (linear + 2.0 * attention);
    let params = if full { layers as f64 * linear } else { 6.0 * tokens * trainable as f64 };
    forward + backward + params
}

/// The processor's model name (from /proc/cpuinfo on Linux), so that figures from different
/// machines can be told apart (PyTorch's MKL is much slower on AMD than on Intel).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Peak single-precision throughput of this machine in GFLOP/s with `threads` threads: each
/// thread runs 12 independent chains of vector fused multiply-adds (AVX-512 when available, else
/// AVX2+FMA, else scalar) on registers only — the hardware limit matmuls are measured against.
pub fn fma_peak(threads: usize) -> f64 {
    fn one_thread(iters: u64) -> (f64, f32) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: guarded by the runtime feature check above.
                return unsafe { avx512(iters) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: guarded by the runtime feature check above.
                return unsafe { avx2(iters) };
            }
        }
        let t = Instant::now();
        let mut acc = [1.0f32; 8];
        for _ in 0..iters {
            for a in &mut acc {
                *a = a.mul_add(0.999_999, 1e-7);
            }
        }
        (8.0 * 2.0 * iters as f64 / t.elapsed().as_secs_f64(), acc.iter().sum())
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(iters: u64) -> (f64, f32) {
        use std::arch::x86_64::*;
        let m = _mm512_set1_ps(0.999_999);
        let c = _mm512_set1_ps(1e-7);
        let mut r = [_mm512_set1_ps(1.0); 12];
        let t = Instant::now();
        for _ in 0..iters {
            for x in &mut r {
                *x = _mm512_fmadd_ps(*x, m, c);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let mut s = _mm512_setzero_ps();
        for x in r {
            s = _mm512_add_ps(s, x);
        }
        (12.0 * 16.0 * 2.0 * iters as f64 / secs, _mm512_reduce_add_ps(s))
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(iters: u64) -> (f64, f32) {
        use std::arch::x86_64::*;
        let m = _mm256_set1_ps(0.999_999);
        let c = _mm256_set1_ps(1e-7);
        let mut r = [_mm256_set1_ps(1.0); 12];
        let t = Instant::now();
        for _ in 0..iters {
            for x in &mut r {
                *x = _mm256_fmadd_ps(*x, m, c);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let mut buf = [0f32; 8];
        let mut s = _mm256_setzero_ps();
        for x in r {
            s = _mm256_add_ps(s, x);
        }
        _mm256_storeu_ps(buf.as_mut_ptr(), s);
        (12.0 * 8.0 * 2.0 * iters as f64 / secs, buf.iter().sum())
    }
    // The best of many short trials spread over at least half a second: on a shared machine a
    // trial can lose a core for a while (five back-to-back trials once read 132 GFLOP/s for a
    // 233 GFLOP/s peak), and the peak is what the hardware can do.
    let iters = 5_000_000u64;
    let mut best = 0f64;
    let start = Instant::now();
    for trial in 0.. {
        if trial >= 5 && start.elapsed().as_secs_f64() >= 0.5 {
            break;
        }
        if trial > 0 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let results: Vec<(f64, f32)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..threads.max(1)).map(|_| sc.spawn(move || one_thread(iters))).collect();
            hs.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        // The checksum keeps the loops from being optimised away.
        let check: f32 = results.iter().map(|r| r.1).sum();
        std::hint::black_box(check);
        best = best.max(results.iter().map(|r| r.0).sum::<f64>() / 1e9);
    }
    best
}

/// The FMA peak at `threads` threads and (with `one_thread`, when `threads` > 1) at one thread:
/// (peak, one-thread peak, equal to the peak without).
pub fn fma_peaks(threads: usize, one_thread: bool) -> (f64, f64) {
    let peak = fma_peak(threads);
    (peak, if one_thread && threads > 1 { fma_peak(1) } else { peak })
}

/// [`fma_peaks`] measured again after a benchmark's runs, the larger of each pair kept: a
/// measurement can only read low (a core lost to another process or the hypervisor for a
/// while), so the larger is the better estimate of the hardware's limit and the share of it a
/// step reached is never overstated by a low reading.
pub fn fma_peaks_after(before: (f64, f64), threads: usize, one_thread: bool) -> (f64, f64) {
    let after = fma_peaks(threads, one_thread);
    (before.0.max(after.0), before.1.max(after.1))
}

/// Sets a step measurement's achieved `gflops` and `fraction_of_peak` from its `step_gflop` and
/// `step_ms_median` (nothing when it has none, e.g. a null).
pub fn set_fraction_of_peak(v: &mut serde_json::Value, peak: f64) {
    if let (Some(g), Some(ms)) = (v["step_gflop"].as_f64(), v["step_ms_median"].as_f64()) {
        v["gflops"] = serde_json::json!(g / (ms / 1e3));
        v["fraction_of_peak"] = serde_json::json!(g / (ms / 1e3) / peak);
    }
}

/// Throughput (GFLOP/s) of the encoder's linear layers at `tokens` rows: the six projections of a
/// MiniLM layer (4 × h×h, h×4h, 4h×h) through our frozen-linear kernel, and of a large square
/// matmul (the library's best case).
pub fn matmul_throughput(tokens: usize, hidden: usize, inter: usize, iters: usize) -> Result<(f64, f64)> {
    let dev = Device::Cpu;
    let key = DropoutKey(1);
    let rnd = |r: usize, c: usize, tag: &str| -> Result<Tensor> {
        let k = key.derive(tag);
        Ok(Tensor::from_vec((0..(r * c) as u64).map(|i| k.uniform(i) - 0.5).collect::<Vec<f32>>(), (r, c), &dev)?)
    };
    let x = rnd(tokens, hidden, "x")?;
    let xi = rnd(tokens, inter, "xi")?;
    let shapes = [(&x, rnd(hidden, hidden, "q")?), (&x, rnd(hidden, hidden, "k")?), (&x, rnd(hidden, hidden, "v")?), (&x, rnd(hidden, hidden, "o")?), (&x, rnd(inter, hidden, "i")?), (&xi, rnd(hidden, inter, "f")?)];
    let flops: f64 = shapes.iter().map(|(a, w)| 2.0 * a.dim(0).unwrap_or(0) as f64 * w.dim(1).unwrap_or(0) as f64 * w.dim(0).unwrap_or(0) as f64).sum();
    let ms = time_runs(2, iters, || {
        for (a, w) in &shapes {
            deltatune::ops::linear(a, w, None)?;
        }
        Ok(())
    })?;
    let encoder = flops / (median(&ms) / 1e3) / 1e9;
    let n = 1536;
    let (a, b) = (rnd(n, n, "a")?, rnd(n, n, "b")?);
    let ms = time_runs(1, iters.max(3) / 2, || {
        deltatune::ops::linear(&a, &b, None)?;
        Ok(())
    })?;
    let square = 2.0 * (n * n * n) as f64 / (median(&ms) / 1e3) / 1e9;
    Ok((encoder, square))
}

/// Results of the decoder training-step benchmark (milliseconds, MiB).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DecoderTrainBench {
    pub delta: String,
    pub batch: usize,
    pub seq_len: usize,
    pub step_ms_median: f64,
    pub fwd_ms_median: f64,
    pub tokens_per_second: f64,
    pub peak_rss_mb: f64,
    /// The frozen base weights as held in memory (quantized) and as f32.
    pub weights_mb: f64,
    pub weights_f32_mb: f64,
    pub trainable_params: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Floating-point operations of one step counted from the shapes ([`decoder_step_flops`]).
    #[serde(default)]
    pub step_gflop: f64,
    /// Threads the step ran on, and the ranks the batch was split over inside the process.
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub ranks: usize,
    /// With profiling: the timed steps' phases and fused ops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
}

/// Token ids uniform in [256, vocab) for `batch` rows of `seq_len`, every one a target.
pub fn synthetic_lm_rows(batch: usize, seq_len: usize, vocab: usize, seed: u64) -> Vec<deltatune::train::lm::LmRow> {
    let key = DropoutKey(seed).derive("synthetic-lm");
    (0..batch)
        .map(|r| {
            let ids: Vec<u32> =
                (0..seq_len).map(|p| 256 + (key.uniform((r * seq_len + p) as u64) * (vocab - 256) as f32) as u32).collect();
            deltatune::train::lm::LmRow { target: vec![true; ids.len()], ids }
        })
        .collect()
}

/// Times causal-LM training steps (forward + loss on every position + backward + AdamW) of the
/// delta `spec` on the decoder at `path`, the frozen base kept as stored (quantized for GGUF), as
/// the PyTorch side (`bench/torch_decoder.py --mode train`) does on the dequantized f32 model.
pub fn decoder_step_bench(
    path: &std::path::Path,
    spec: &str,
    batch: usize,
    seq_len: usize,
    warmup: usize,
    steps: usize,
    profile: bool,
    ranks: usize,
) -> Result<DecoderTrainBench> {
    use deltatune::train::lm::{batch_nll, make_row_batch};
    use deltatune::train::optim::{AdamW, AdamWConfig};
    use deltatune::{attach, ForwardCtx};
    let dev = Device::Cpu;
    let mut lm = deltatune::lm::CausalLm::load(path, &dev)?;
    let specs = vec![deltatune::delta::DeltaSpec::parse_cli(spec)?];
    attach::attach(&mut lm.model, &specs, attach::AttachOptions { seed: 42, tokenizer: None })?;
    let params = attach::trainable_vars(&lm.model);
    let rows = synthetic_lm_rows(batch, seq_len, lm.model.config.vocab_size, 42);
    let num_targets = make_row_batch(&rows, 0, &dev)?.num_targets;
    let mut opt = AdamW::new(params.clone(), AdamWConfig::default())?;
    let ranks = Ranks::new(ranks, batch)?;
    // One rank's rows (all of them alone): its summed loss over the whole batch's targets, so the
    // ranks' gradients add up to the whole batch's.
    let shards: Vec<(std::ops::Range<usize>, deltatune::train::lm::LmBatch)> = (0..ranks.count())
        .map(|r| {
            let span = deltatune::dist::shard(batch, r, ranks.count());
            Ok((span.clone(), make_row_batch(&rows[span], 0, &dev)?))
        })
        .collect::<Result<_>>()?;
    let part = |ctx: &ForwardCtx, rows: std::ops::Range<usize>| -> Result<Part> {
        let t0 = Instant::now();
        let sb = &shards.iter().find(|(span, _)| *span == rows).ok_or_else(|| deltatune::Error::Distributed("no such shard".into()))?.1;
        let loss = deltatune::ops::in_batch_rows(rows.start, rows.len(), || batch_nll(&lm.model, sb, ctx))?;
        let loss = (loss / num_targets as f64)?;
        let lv = loss.to_scalar::<f32>()? as f64;
        let fwd = t0.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let g = params.iter().filter_map(|(n, v)| grads.get(v).map(|t| (n.clone(), t.clone()))).collect();
        Ok((lv, fwd, g))
    };
    let (mut step_ms, mut fwd_ms, mut losses) = (Vec::new(), Vec::new(), Vec::new());
    let (mut bwd_s, mut opt_s) = (0f64, 0f64);
    for i in 0..warmup + steps {
        if profile && i == warmup {
            deltatune::ops::profile::take();
            deltatune::ops::profile::set_enabled(true);
        }
        let t0 = Instant::now();
        let ctx = ForwardCtx::train(DropoutKey(42).derive_n(i as u64));
        let (lv, fwd, g) = ranks.step(|rows| part(&ctx, rows))?;
        losses.push(lv);
        let t2 = Instant::now();
        opt.step(&g, 1e-4)?;
        let t3 = Instant::now();
        if i >= warmup {
            step_ms.push((t3 - t0).as_secs_f64() * 1e3);
            fwd_ms.push(fwd * 1e3);
            bwd_s += (t2 - t0).as_secs_f64() - fwd;
            opt_s += (t3 - t2).as_secs_f64();
        }
    }
    let profile = profile.then(|| {
        deltatune::ops::profile::set_enabled(false);
        let n = steps.max(1) as f64;
        let mut ops: Vec<(String, String, f64, f64)> =
            deltatune::ops::profile::take().into_iter().map(|e| (e.op, e.phase, e.seconds * 1e3 / n, e.calls as f64 / n)).collect();
        ops.sort_by(|a, b| b.2.total_cmp(&a.2));
        StepProfile { steps, forward_ms: fwd_ms.iter().sum::<f64>() / n, backward_ms: bwd_s * 1e3 / n, optimizer_ms: opt_s * 1e3 / n, ops }
    });
    let (held, f32_bytes) = lm.model.weight_bytes();
    let step = median(&step_ms);
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let step_gflop = decoder_step_flops(&lm.model.config, batch, seq_len, num_targets, attach::frozen_prefix_layers(&lm.model), trainable) / 1e9;
    Ok(DecoderTrainBench {
        delta: spec.to_string(),
        batch,
        seq_len,
        step_ms_median: step,
        fwd_ms_median: median(&fwd_ms),
        tokens_per_second: (batch * seq_len) as f64 / (step / 1e3),
        peak_rss_mb: peak_rss_mb(),
        weights_mb: held as f64 / (1 << 20) as f64,
        weights_f32_mb: f32_bytes as f64 / (1 << 20) as f64,
        trainable_params: trainable,
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss: losses.last().copied().unwrap_or(f64::NAN),
        step_gflop,
        threads: rayon::current_num_threads(),
        ranks: ranks.count(),
        profile,
    })
}

/// Greedy generation speed of the decoder with an optional delta (`spec`, at its initial
/// values: the compute is the same as a trained one's): median tokens/s of the decode phase over
/// `runs` runs of exactly `tokens` new tokens, and the median prefill milliseconds. Every delta
/// is detached afterwards.
pub fn decoder_generate_bench(lm: &mut deltatune::lm::CausalLm, spec: Option<&str>, prompt: &str, tokens: usize, runs: usize) -> Result<(f64, f64)> {
    use deltatune::attach;
    if let Some(s) = spec {
        let specs = vec![deltatune::delta::DeltaSpec::parse_cli(s)?];
        attach::attach(&mut lm.model, &specs, attach::AttachOptions { seed: 42, tokenizer: None })?;
    }
    let r = decoder_generate_bench_attached(lm, prompt, tokens, runs);
    for s in lm.model.sites_mut() {
        s.deltas.clear();
    }
    r
}

/// Greedy generation with whatever deltas are attached: (median decode tokens/s, median prefill
/// milliseconds) over `runs`.
pub fn decoder_generate_bench_attached(lm: &mut deltatune::lm::CausalLm, prompt: &str, tokens: usize, runs: usize) -> Result<(f64, f64)> {
    let ids = lm.tokenizer.encode(prompt)?;
    let opts = deltatune::lm::GenerateOptions { max_new_tokens: tokens, ignore_eos: true, ..Default::default() };
    let (mut tps, mut prefill) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let g = deltatune::lm::generate(lm, &ids, &opts, &mut |_| {})?;
        tps.push(g.tokens_per_second);
        prefill.push(g.prefill_seconds * 1e3);
    }
    Ok((median(&tps), median(&prefill)))
}

/// Floating-point operations (2 per multiply-add) of one training step of a decoder on `batch` ×
/// `seq` tokens with `targets` predicted tokens: every layer's forward (q, k, v, o, gate, up and
/// down projections; the causal attention products QKᵀ and PV over the lower triangle) and the
/// output projection at the target positions; the backward of the output projection and of the
/// layers from `lowest` up (input gradients through the frozen projections, two products per
/// attention product); 6 per trainable parameter and token for the deltas. Norms, rotary
/// embeddings, the activation, softmax and the optimizer are left out.
pub fn decoder_step_flops(c: &deltatune::backbone::llama::LlamaConfig, batch: usize, seq: usize, targets: usize, lowest: usize, trainable: usize) -> f64 {
    let (h, i, v) = (c.hidden_size as f64, c.intermediate_size as f64, c.vocab_size as f64);
    let (q, kv) = ((c.num_attention_heads * c.head_dim) as f64, (c.num_key_value_heads * c.head_dim) as f64);
    let tokens = (batch * seq) as f64;
    let linear = 2.0 * tokens * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i);
    let attention = 2.0 * 2.0 * batch as f64 * (seq * (seq + 1) / 2) as f64 * q;
    let layers = c.num_hidden_layers;
    let head = 2.0 * targets as f64 * h * v;
    let forward = layers as f64 * (linear + attention) + head;
    let backward = layers.saturating_sub(lowest) as f64 * (linear + 2.0 * attention) + head;
    forward + backward + 6.0 * tokens * trainable as f64
}
