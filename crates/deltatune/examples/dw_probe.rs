//! Probe: a trained linear's backward (dx and dW) at the encoder's shapes, threads from argv.
use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let threads: usize = std::env::args().nth(1).map(|s| s.parse().unwrap_or(2)).unwrap_or(2);
    deltatune::ops::set_threads(threads)?;
    let dev = Device::Cpu;
    for (m, k, n) in [(4096usize, 384usize, 384usize), (4096, 384, 1536), (4096, 1536, 384)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
        let run = || -> anyhow::Result<f64> {
            let y = deltatune::ops::linear(x.as_tensor(), w.as_tensor(), None)?;
            let l = (y * &up)?.sum_all()?;
            let t = Instant::now();
            let _g = l.backward()?;
            Ok(t.elapsed().as_secs_f64())
        };
        for _ in 0..2 {
            run()?;
        }
        deltatune::ops::profile::take();
        deltatune::ops::profile::set_enabled(true);
        for _ in 0..10 {
            run()?;
        }
        deltatune::ops::profile::set_enabled(false);
        let s = deltatune::ops::profile::take().iter().filter(|e| e.op == "trained-linear" && e.phase == "bwd").map(|e| e.seconds).sum::<f64>() / 10.0;
        let gflops = 4.0 * (m * k * n) as f64 / s / 1e9;
        println!("{threads} threads: backward of {m}x{k} . {k}x{n} (dx + dW): {:.2} ms  {gflops:.0} GFLOP/s", s * 1e3);
    }
    Ok(())
}
