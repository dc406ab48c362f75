//! Probe: a frozen linear's forward and input gradient (the products of a LoRA step's frozen
//! maps) at the decoder's and encoder's shapes, in GFLOP/s, threads from argv; compare with the
//! FMA peak `deltatune bench matmul` measures.
use candle_core::{Device, Tensor, Var};

fn main() -> anyhow::Result<()> {
    let threads: usize = std::env::args().nth(1).map(|s| s.parse().unwrap_or(2)).unwrap_or(2);
    deltatune::ops::set_threads(threads)?;
    let dev = Device::Cpu;
    for (m, k, n) in [(2048usize, 576usize, 1536usize), (2048, 1536, 576), (2048, 576, 576), (4096, 384, 1536), (4096, 1536, 384), (4096, 384, 384)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let up = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
        let run = || -> anyhow::Result<()> {
            let y = deltatune::ops::linear(x.as_tensor(), &w, None)?;
            let _g = (y * &up)?.sum_all()?.backward()?;
            Ok(())
        };
        let runs = 20;
        for _ in 0..3 {
            run()?;
        }
        deltatune::ops::profile::take();
        deltatune::ops::profile::set_enabled(true);
        for _ in 0..runs {
            run()?;
        }
        deltatune::ops::profile::set_enabled(false);
        let mut ms = [0f64; 2]; // forward, input gradient
        for e in deltatune::ops::profile::take().iter().filter(|e| e.op == "frozen-linear") {
            ms[usize::from(e.phase == "bwd")] += e.seconds * 1e3 / runs as f64;
        }
        let gf = |t: f64| 2.0 * (m * k * n) as f64 / t / 1e6;
        println!(
            "{threads} thread(s), {m} x {k} -> {n}: forward {:.2} ms = {:.0} GFLOP/s, input gradient {:.2} ms = {:.0} GFLOP/s",
            ms[0], gf(ms[0]), ms[1], gf(ms[1])
        );
    }
    Ok(())
}
