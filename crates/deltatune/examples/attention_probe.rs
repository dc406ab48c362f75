//! Probe of the encoder attention's cost (development aid): forward and forward + backward of the
//! fused bidirectional attention on MiniLM's shapes (12 heads of 32, batch 32 × 128 tokens) per
//! layer, with the probabilities' dropout (0.1, as in training) and without, median of the runs,
//! and the GFLOP/s the products reach (forward: q kᵀ and p v; backward: the recomputed q kᵀ, dO vᵀ,
//! pᵀ dO, dS k, dSᵀ q). `cargo run --release -p deltatune --example attention_probe [THREADS]`.
use candle_core::{DType, Device, Tensor, Var};
use deltatune::ops::DropoutKey;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let threads = std::env::args().nth(1).map(|t| t.parse()).transpose()?.unwrap_or(2);
    deltatune::ops::set_threads(threads)?;
    let (b, t, nh, d) = (32usize, 128usize, 12usize, 32usize);
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nh * d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nh * d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nh * d), &dev)?)?;
    let bias = Tensor::zeros((b, t), DType::F32, &dev)?;
    let up = Tensor::randn(0f32, 1.0, (b, t, nh * d), &dev)?;
    let head_flop = 2.0 * (t * t * d) as f64;
    let fwd_gflop = (b * nh) as f64 * 2.0 * head_flop / 1e9;
    let bwd_gflop = (b * nh) as f64 * 5.0 * head_flop / 1e9;
    let step = |p: f32| -> anyhow::Result<(f64, f64)> {
        let drop = (p > 0.0).then_some((p, DropoutKey(7)));
        let start = Instant::now();
        let out = deltatune::ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, nh, drop)?;
        let fwd = start.elapsed().as_secs_f64() * 1e3;
        let mid = Instant::now();
        let _ = (out * &up)?.sum_all()?.backward()?;
        Ok((fwd, mid.elapsed().as_secs_f64() * 1e3))
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    deltatune::ops::profile::set_enabled(true);
    for p in [0.1f32, 0.0] {
        let (mut f, mut bw) = (Vec::new(), Vec::new());
        for i in 0..12 {
            let (a, c) = step(p)?;
            if i >= 2 {
                f.push(a);
                bw.push(c);
            }
        }
        let (f, bw) = (median(f), median(bw));
        for e in deltatune::ops::profile::take() {
            let ms = 1e3 * e.seconds / e.calls as f64;
            let gflop = if e.phase == "fwd" { fwd_gflop } else { bwd_gflop };
            println!("  op {} {}: {ms:.1} ms per call ({:.0} GFLOP/s, {} calls)", e.op, e.phase, gflop / ms * 1e3, e.calls);
        }
        println!(
            "dropout {p}: fwd {f:.1} ms ({:.0} GFLOP/s), bwd {bw:.1} ms incl. candle's product with the upstream ({:.0} GFLOP/s)",
            fwd_gflop / f * 1e3,
            bwd_gflop / bw * 1e3
        );
    }
    Ok(())
}
