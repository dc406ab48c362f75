//! Probe of the decoder training step's dequantization cost (development aid): for every matrix
//! of one block of a GGUF decoder, the time to dequantize it to f32 (done once in the forward and
//! once in the backward of each training step) against the training path's product (`ops::qlinear`, exact: dequantize + f32 gemm) (2,048 rows, the
//! forward of a batch 8 × 256). `cargo run --release -p deltatune --example dequant_probe FILE.gguf [THREADS]`.
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: dequant_probe FILE.gguf [THREADS]"))?;
    let threads = std::env::args().nth(2).map(|t| t.parse()).transpose()?.unwrap_or(1);
    deltatune::ops::set_threads(threads)?;
    let mut f = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut f)?;
    let dev = Device::Cpu;
    let (mut deq_ms, mut mm_ms) = (0.0, 0.0);
    let mut names: Vec<&String> = content.tensor_infos.keys().filter(|n| n.starts_with("blk.0.") && n.ends_with(".weight")).collect();
    names.sort();
    for name in names {
        let q = std::sync::Arc::new(content.tensor(&mut f, name, &dev)?);
        if q.shape().dims().len() != 2 {
            continue;
        }
        let (n, k) = q.shape().dims2()?;
        let x = Tensor::randn(0f32, 1.0, (2048, k), &dev)?;
        let mut best_d = f64::MAX;
        let mut best_m = f64::MAX;
        for _ in 0..5 {
            let s = Instant::now();
            let w = q.dequantize(&dev)?;
            best_d = best_d.min(s.elapsed().as_secs_f64() * 1e3);
            drop(w);
            // The training path's product: the frozen quantized linear, exact (dequantize + f32 gemm).
            let s = Instant::now();
            let _y = deltatune::ops::qlinear(&x, &q, true)?;
            best_m = best_m.min(s.elapsed().as_secs_f64() * 1e3);
        }
        println!("{name:32} {:?} {n}x{k}: dequantize {best_d:.2} ms ({:.0} M weights/s), qlinear (dequantize + gemm) 2048 rows {best_m:.2} ms", q.dtype(), (n * k) as f64 / best_d / 1e3);
        deq_ms += best_d;
        mm_ms += best_m;
    }
    println!("block 0: dequantize {deq_ms:.1} ms, qlinear {mm_ms:.1} ms; a training step dequantizes twice per matrix (forward, backward) and runs about 3 products of this size");
    Ok(())
}
