//! Probe of grouped-query attention's cost (development aid): forward + backward of the fused
//! causal attention reading the key/value heads in place, against expanding them to every query
//! head first (what the decoder did before), on SmolLM2-135M's attention shapes (9 query heads,
//! 3 key/value heads, head size 64) at batch 8 × 256 tokens, per layer, alternating the two,
//! median of the runs. `cargo run --release -p deltatune --example gqa_probe [THREADS]`.
use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let threads = std::env::args().nth(1).map(|t| t.parse()).transpose()?.unwrap_or(2);
    deltatune::ops::set_threads(threads)?;
    let (b, t, nh, nkv, d) = (8usize, 256usize, 9usize, 3usize, 64usize);
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nh * d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nkv * d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nkv * d), &dev)?)?;
    let bias = Tensor::zeros((b, t), DType::F32, &dev)?;
    let up = Tensor::randn(0f32, 1.0, (b, t, nh * d), &dev)?;
    let rep = nh / nkv;
    let expand = |y: &Tensor| -> anyhow::Result<Tensor> {
        Ok(y.reshape((b, t, nkv, 1, d))?.expand((b, t, nkv, rep, d))?.reshape((b, t, nh * d))?)
    };
    let step = |grouped: bool| -> anyhow::Result<(f64, Tensor)> {
        let start = Instant::now();
        let out = if grouped {
            deltatune::ops::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, nh)?
        } else {
            deltatune::ops::causal_attention(q.as_tensor(), &expand(k.as_tensor())?, &expand(v.as_tensor())?, &bias, nh)?
        };
        let fwd = start.elapsed().as_secs_f64() * 1e3;
        let grads = (out * &up)?.sum_all()?.backward()?;
        if std::env::var("PROBE_VERBOSE").is_ok() {
            eprintln!("grouped {grouped}: fwd {fwd:.1} ms, total {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
        }
        let dk = grads.get(k.as_tensor()).expect("dk").clone();
        Ok((start.elapsed().as_secs_f64() * 1e3, dk))
    };
    if std::env::var("PROBE_VERBOSE").is_ok() {
        deltatune::ops::profile::set_enabled(true);
    }
    let (mut grouped, mut expanded) = (Vec::new(), Vec::new());
    let mut worst = 0f32;
    for i in 0..12 {
        let (tg, dg) = step(true)?;
        let (te, de) = step(false)?;
        worst = worst.max((dg - de)?.abs()?.max_all()?.to_scalar::<f32>()?);
        if i >= 2 {
            grouped.push(tg);
            expanded.push(te);
        }
    }
    if std::env::var("PROBE_VERBOSE").is_ok() {
        for e in deltatune::ops::profile::take() {
            eprintln!("{} {}: {:.1} ms per call ({} calls, both variants)", e.op, e.phase, 1e3 * e.seconds / e.calls as f64, e.calls);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (g, e) = (median(&mut grouped), median(&mut expanded));
    println!(
        "attention fwd+bwd per layer, {b} x {t}, {nh} heads over {nkv} key/value heads, {threads} threads: \
         in place {g:.1} ms, expanded {e:.1} ms, ratio {:.2}; max |dK difference| {worst:.1e}",
        g / e
    );
    Ok(())
}
