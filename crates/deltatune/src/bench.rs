//! Benchmark building blocks: the synthetic batch of the standard protocol and timing helpers.
//! (The side-by-side runs with PyTorch live in the CLI's `bench` command.)

use crate::data::tokenize::EncodedBatch;
use crate::error::Result;
use crate::ops::DropoutKey;
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
}
