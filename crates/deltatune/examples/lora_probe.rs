//! Probe of the fused LoRA linear's cost (development aid): forward + backward of one frozen
//! linear map with a LoRA update, as one op (`ops::lora_linear`) against the composition it
//! replaced (the frozen product, two low-rank products and a sum, each a node of candle's graph),
//! alternating the two in one process, median of the runs. Default: the encoder's query
//! projection (batch 32 × 128 tokens, 384 → 384, r = 8); `--decoder` SmolLM2's (8 × 256,
//! 576 → 576). `cargo run --release -p deltatune --example lora_probe [THREADS] [--decoder]`.
use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = args.iter().find(|a| !a.starts_with("--")).map(|t| t.parse()).transpose()?.unwrap_or(2);
    deltatune::ops::set_threads(threads)?;
    let (rows, n, r) = if args.iter().any(|a| a == "--decoder") { (8 * 256, 576, 8) } else { (32 * 128, 384, 8) };
    let dev = Device::Cpu;
    // The input takes part in the graph (a layer above the lowest delta).
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, n), &dev)?)?;
    let w = (Tensor::randn(0f32, 1.0, (n, n), &dev)? * 0.05)?;
    let bias = (Tensor::randn(0f32, 1.0, n, &dev)? * 0.05)?;
    let a = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (r, n), &dev)? * 0.05)?)?;
    let b = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (n, r), &dev)? * 0.05)?)?;
    let up = Tensor::randn(0f32, 1.0, (rows, n), &dev)?;
    let step = |fused: bool| -> anyhow::Result<(f64, Tensor, Tensor)> {
        let start = Instant::now();
        let bm = (b.as_tensor() * 2.0)?; // the scale folded into B, as LoRA does
        let y = if fused {
            deltatune::ops::lora_linear(x.as_tensor(), &w, Some(&bias), a.as_tensor(), &bm)?
        } else {
            deltatune::ops::lora_linear_composed(x.as_tensor(), &w, Some(&bias), a.as_tensor(), &bm)?
        };
        let grads = (y * &up)?.sum_all()?.backward()?;
        let (dx, da) = (grads.get(x.as_tensor()).expect("dx").clone(), grads.get(a.as_tensor()).expect("dA").clone());
        Ok((start.elapsed().as_secs_f64() * 1e3, dx, da))
    };
    let verbose = std::env::var("PROBE_VERBOSE").is_ok();
    deltatune::ops::profile::set_enabled(verbose);
    let (mut fused, mut composed) = (Vec::new(), Vec::new());
    let mut worst = 0f32;
    for i in 0..22 {
        let (tf, xf, af) = step(true)?;
        let (tc, xc, ac) = step(false)?;
        let rel = |p: &Tensor, q: &Tensor| -> anyhow::Result<f32> {
            Ok((p - q)?.abs()?.max_all()?.to_scalar::<f32>()? / q.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
        };
        worst = worst.max(rel(&xf, &xc)?).max(rel(&af, &ac)?);
        if i >= 2 {
            fused.push(tf);
            composed.push(tc);
        }
    }
    if verbose {
        for e in deltatune::ops::profile::take() {
            eprintln!("{} {}: {:.2} ms per call ({} calls)", e.op, e.phase, 1e3 * e.seconds / e.calls as f64, e.calls);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, c) = (median(&mut fused), median(&mut composed));
    println!(
        "LoRA linear fwd+bwd, {rows} rows, {n} -> {n}, r {r}, {threads} threads: one op {f:.2} ms, composition {c:.2} ms, \
         ratio {:.2}; max relative difference of dx, dA {worst:.1e}",
        f / c
    );
    Ok(())
}
