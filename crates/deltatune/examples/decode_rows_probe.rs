//! Probe of batched decoding speed: ms per `decode_rows` step at 1, 2, 4, 8 and 16 rows on the
//! default decoder, with the fused-op profile of the 8-row steps (development aid).
use candle_core::{Device, Tensor};
use deltatune::backbone::llama::{last_position, KvCache};
use deltatune::lm::CausalLm;
use deltatune::ForwardCtx;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    deltatune::ops::set_threads(2)?;
    let path = deltatune::assets::default_decoder(&mut |m| eprintln!("{m}"))?;
    let mut lm = CausalLm::load(&path, &Device::Cpu)?;
    // PROBE_DELTA=lora:r=8,... attaches a delta to every row.
    if let Ok(spec) = std::env::var("PROBE_DELTA") {
        let spec = deltatune::delta::DeltaSpec::parse_cli(&spec)?;
        deltatune::attach::attach(&mut lm.model, &[spec], deltatune::attach::AttachOptions { seed: 1, tokenizer: None })?;
    }
    let ctx = ForwardCtx::inference();
    let ids = lm.tokenizer.encode("Once upon a time, in a small village,")?;
    for m in [1usize, 8] {
        let mut caches: Vec<KvCache> = Vec::new();
        let t = Instant::now();
        for _ in 0..m {
            let mut c = KvCache::new(lm.model.num_layers());
            let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let h = lm.model.forward(&x, None, Some(&mut c), &ctx)?;
            lm.model.logits(&last_position(&h)?, &ctx)?;
            caches.push(c);
        }
        let prefill = t.elapsed().as_secs_f64() / m as f64;
        let steps = 16;
        deltatune::ops::profile::set_enabled(m == 8);
        let t = Instant::now();
        let (mut body, mut head) = (0.0, 0.0);
        for s in 0..steps {
            let toks: Vec<u32> = (0..m).map(|i| (100 + i + s) as u32).collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let t0 = Instant::now();
            let h = lm.model.decode_rows(&toks, &mut refs, &ctx)?;
            let t1 = Instant::now();
            lm.model.logits(&h, &ctx)?.to_vec2::<f32>()?;
            body += (t1 - t0).as_secs_f64();
            head += t1.elapsed().as_secs_f64();
        }
        let per = t.elapsed().as_secs_f64() / steps as f64;
        println!(
            "rows {m:>2}: prefill {:.1} ms/seq ({} tokens), step {:.1} ms (layers {:.1}, logits {:.1}) -> {:.0} tokens/s",
            prefill * 1e3, ids.len(), per * 1e3, body / steps as f64 * 1e3, head / steps as f64 * 1e3, m as f64 / per
        );
        if m == 8 {
            deltatune::ops::profile::set_enabled(false);
            for e in deltatune::ops::profile::take() {
                println!("    {:<20} {:<4} {:>8.1} ms {:>6} calls", e.op, e.phase, e.seconds * 1e3 / steps as f64, e.calls / steps as u64);
            }
        }
    }
    Ok(())
}
