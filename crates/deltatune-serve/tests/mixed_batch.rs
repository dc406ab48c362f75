//! Mixed-delta batching in the core, below the server: rows of different deltas decoding
//! together (`LlamaModel::decode_rows` with a `RowRoute`) give each row exactly what it gets alone,
//! and deltas that replace base parameters refuse to share a batch.

use candle_core::{Device, Tensor};
use deltatune::backbone::llama::{last_position, KvCache};
use deltatune::lm::CausalLm;
use deltatune::ForwardCtx;
use std::path::PathBuf;
use std::sync::OnceLock;

fn decoder_file() -> Option<PathBuf> {
    static F: OnceLock<Option<PathBuf>> = OnceLock::new();
    F.get_or_init(|| match deltatune::assets::default_decoder(&mut |m| eprintln!("{m}")) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIP: the default decoder is not available ({e})");
            None
        }
    })
    .clone()
}

/// Mixed-delta batching (serving): rows of different deltas decoding together give each row what
/// it gets alone.
mod mixed_batch {
    use super::*;
    use deltatune::attach::{self, AttachOptions};
    use deltatune::core::RowRoute;
    use deltatune::delta::DeltaSpec;

    /// Sets every tensor of group `name` to a deterministic non-trivial table around `center`.
    fn fill(lm: &CausalLm, name: &str, center: f64, scale: f64) {
        for (k, (_, _, v)) in attach::group_vars(&lm.model, name).into_iter().enumerate() {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|i| (center + scale * ((i as f64) * 0.37 + k as f64).sin()) as f32).collect();
            v.set(&Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap()).unwrap();
        }
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    fn argmax(v: &[f32]) -> u32 {
        v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
    }

    /// Prefills `ids` alone through `group` (or the bare backbone): the cache and last logits.
    fn prefill(lm: &CausalLm, group: Option<&str>, ids: &[u32]) -> (KvCache, Vec<f32>) {
        let route = match group {
            Some(g) => RowRoute::new(1).with(g, 0, 1),
            None => RowRoute::new(1),
        };
        let ctx = ForwardCtx::eval().with_route(&route);
        let mut cache = KvCache::new(lm.model.num_layers());
        let t = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let h = lm.model.forward(&t, None, Some(&mut cache), &ctx).unwrap();
        let l = lm.model.logits(&last_position(&h).unwrap(), &ctx).unwrap();
        (cache, rows(&l).remove(0))
    }

    #[test]
    fn mixed_delta_decoding_equals_each_request_alone() {
        let Some(f) = decoder_file() else {
            eprintln!("SKIP mixed_delta_decoding_equals_each_request_alone: decoder unavailable");
            return;
        };
        let mut lm = CausalLm::load(&f, &Device::Cpu).unwrap();
        let specs = [
            "lora:r=4,lora_alpha=8,target=q_proj+v_proj+down_proj,name=a",
            "ia3:name=b",
            "prefix:tokens=3,name=c",
            "lora:r=2,lora_alpha=4,target=o_proj+up_proj,name=d",
        ];
        let specs: Vec<DeltaSpec> = specs.iter().map(|s| DeltaSpec::parse_cli(s).unwrap()).collect();
        attach::attach(&mut lm.model, &specs, AttachOptions::default()).unwrap();
        fill(&lm, "a", 0.0, 0.05);
        fill(&lm, "b", 1.0, 0.2);
        fill(&lm, "c", 0.0, 0.5);
        fill(&lm, "d", 0.0, 0.05);
        // (group, prompt): rows at different lengths, one on the bare backbone.
        let reqs: [(Option<&str>, &str); 5] = [
            (Some("a"), "The capital of France is"),
            (None, "Once upon a time"),
            (Some("b"), "def fibonacci(n):"),
            (Some("c"), "Water boils at"),
            (Some("d"), "The three primary colours are red,"),
        ];
        let steps = 6;
        // Alone: prefill, then one-token forwards through the ordinary cached path.
        let mut alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = Vec::new();
        for (g, p) in &reqs {
            let ids = lm.tokenizer.encode(p).unwrap();
            let (mut cache, mut logits) = prefill(&lm, *g, &ids);
            let route = match g {
                Some(g) => RowRoute::new(1).with(*g, 0, 1),
                None => RowRoute::new(1),
            };
            let ctx = ForwardCtx::eval().with_route(&route);
            let (mut toks, mut all) = (Vec::new(), Vec::new());
            for _ in 0..steps {
                let next = argmax(&logits);
                toks.push(next);
                let t = Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let h = lm.model.forward(&t, None, Some(&mut cache), &ctx).unwrap();
                logits = rows(&lm.model.logits(&last_position(&h).unwrap(), &ctx).unwrap()).remove(0);
                all.push(logits.clone());
            }
            alone.push((toks, all));
        }
        // The deltas change the output (otherwise the comparison proves nothing).
        let (bare_ids, _) = (lm.tokenizer.encode(reqs[0].1).unwrap(), ());
        let (_, bare) = prefill(&lm, None, &bare_ids);
        let (_, with_a) = prefill(&lm, Some("a"), &bare_ids);
        let moved = bare.iter().zip(&with_a).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-2, "delta a changes the logits by only {moved}");
        // Mixed: the same prefills, then every row decodes in one batch, each through its delta.
        let mut caches = Vec::new();
        let mut next = Vec::new();
        for (g, p) in &reqs {
            let ids = lm.tokenizer.encode(p).unwrap();
            let (cache, logits) = prefill(&lm, *g, &ids);
            caches.push(cache);
            next.push(argmax(&logits));
        }
        let route = RowRoute::new(5).with("a", 0, 1).with("b", 2, 1).with("c", 3, 1).with("d", 4, 1);
        let ctx = ForwardCtx::eval().with_route(&route);
        let mut worst = 0f32;
        for step in 0..steps {
            for (r, (toks, _)) in alone.iter().enumerate() {
                assert_eq!(next[r], toks[step], "row {r} step {step}: greedy tokens differ");
            }
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let h = lm.model.decode_rows(&next, &mut refs, &ctx).unwrap();
            let l = rows(&lm.model.logits(&h, &ctx).unwrap());
            for (r, row) in l.iter().enumerate() {
                let d = row.iter().zip(&alone[r].1[step]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                worst = worst.max(d);
                next[r] = argmax(row);
            }
        }
        assert!(worst < 1e-4, "mixed-batch logits differ from alone by {worst}");
    }

    #[test]
    fn parameter_replacing_deltas_refuse_to_share_a_batch() {
        let Some(f) = decoder_file() else {
            eprintln!("SKIP parameter_replacing_deltas_refuse_to_share_a_batch: decoder unavailable");
            return;
        };
        let mut lm = CausalLm::load(&f, &Device::Cpu).unwrap();
        let spec = DeltaSpec::parse_cli("ln_tuning:name=ln").unwrap();
        attach::attach(&mut lm.model, &[spec], AttachOptions::default()).unwrap();
        let sites = lm.model.sites();
        assert!(sites.iter().any(|s| s.replaces_params("ln").unwrap()));
        let ids: Vec<u32> = lm.tokenizer.encode("Hello there").unwrap();
        let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let t2 = Tensor::cat(&[&t, &t], 0).unwrap();
        let route = RowRoute::new(2).with("ln", 0, 1);
        let err = lm.model.forward(&t2, None, None, &ForwardCtx::eval().with_route(&route)).unwrap_err().to_string();
        assert!(err.contains("cannot share a batch"), "{err}");
    }
}
