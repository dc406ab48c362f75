//! Quick probe of matmul throughput at the encoder's shapes (development aid).
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [(2048usize, 384usize, 384usize), (2048, 384, 1536), (2048, 1536, 384)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let b = Tensor::zeros(n, candle_core::DType::F32, &dev)?;
        for _ in 0..3 {
            deltatune::ops::linear(&x, &w, Some(&b))?;
        }
        let iters = 20;
        let t = Instant::now();
        for _ in 0..iters {
            deltatune::ops::linear(&x, &w, Some(&b))?;
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        let gflops = 2.0 * (m * k * n) as f64 / s / 1e9;
        println!("linear {m}x{k} . {k}x{n}: {:.2} ms  {gflops:.0} GFLOP/s", s * 1e3);
    }
    Ok(())
}
