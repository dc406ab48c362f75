//! The Llama-family decoder on the default GGUF model (SmolLM2-135M-Instruct, Q4_1) against the
//! PyTorch + transformers fixture written by `tools/decoder_reference.py`.

use crate::common::{decoder_file, fixture};
use candle_core::{Device, Tensor};
use deltatune::backbone::llama::{last_position, KvCache, LlamaModel};
use deltatune::io::gguf::GgufFile;
use deltatune::lm::{generate, CausalLm, GenerateOptions, LmTokenizer};
use deltatune::ForwardCtx;
use std::sync::OnceLock;

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_reference.json")).unwrap()).unwrap()
}

fn lm() -> Option<&'static CausalLm> {
    static LM: OnceLock<Option<CausalLm>> = OnceLock::new();
    LM.get_or_init(|| {
        let f = decoder_file()?;
        let mut lm = CausalLm::load(&f, &Device::Cpu).unwrap();
        lm.model.set_exact(true);
        Some(lm)
    })
    .as_ref()
}

macro_rules! require_decoder {
    () => {
        match lm() {
            Some(l) => l,
            None => {
                eprintln!("SKIP {}: decoder unavailable", module_path!());
                return;
            }
        }
    };
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// A freshly loaded default decoder in exact (dequantize-and-multiply) mode.
fn fresh() -> Option<CausalLm> {
    let f = decoder_file()?;
    let mut lm = CausalLm::load(&f, &Device::Cpu).unwrap();
    lm.model.set_exact(true);
    Some(lm)
}

fn logits_of(lm: &CausalLm, text: &str) -> Tensor {
    let ids = lm.tokenizer.encode(text).unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let ctx = ForwardCtx::eval();
    lm.model.logits(&lm.model.forward(&t, None, None, &ctx).unwrap(), &ctx).unwrap()
}

/// Checks logits rows against a fixture entry (`logits_head`, `argmax`, `logsumexp`): same
/// argmax and log-sum-exp within 5e-4 at every position. Returns the worst difference on the
/// stored logits.
fn check_against(rows: &[Vec<f32>], want: &serde_json::Value, what: &str) -> f32 {
    let argmax = ids_of(&want["argmax"]);
    let lse = floats(&want["logsumexp"]);
    assert_eq!(rows.len(), argmax.len(), "{what}: positions");
    let mut worst = 0f32;
    for (p, row) in rows.iter().enumerate() {
        for (a, b) in row.iter().zip(floats(&want["logits_head"][p])) {
            worst = worst.max((a - b).abs());
        }
        let am = row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
        assert_eq!(am as u32, argmax[p], "{what}: argmax at position {p}");
        let m = row.iter().cloned().fold(f32::MIN, f32::max);
        let l = m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
        assert!((l - lse[p]).abs() < 5e-4, "{what}: logsumexp {l} vs {}", lse[p]);
    }
    worst
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn loads_with_hf_names_and_quantized_weights() {
    let lm = require_decoder!();
    let m = &lm.model;
    assert_eq!(m.config.num_hidden_layers, 30);
    assert_eq!(m.config.hidden_size, 576);
    assert_eq!((m.config.num_attention_heads, m.config.num_key_value_heads), (9, 3));
    assert!(m.config.tie_word_embeddings);
    // SmolLM2-135M: 134,515,008 parameters (the tied head counted once).
    assert_eq!(m.num_params(), 134_515_008);
    let tree = m.tree();
    let paths: Vec<&str> = tree.modules.iter().map(|s| s.path.as_str()).collect();
    for p in ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj", "model.norm"] {
        assert!(paths.contains(&p), "{p} missing from the tree");
    }
    let (held, f32_bytes) = m.weight_bytes();
    assert!(held * 4 < f32_bytes, "quantized weights take {held} bytes, f32 would take {f32_bytes}");
}

#[test]
fn tokenizer_matches_transformers() {
    let lm = require_decoder!();
    for case in reference()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = lm.tokenizer.encode(prompt).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "token ids of {prompt:?}");
        assert_eq!(lm.tokenizer.decode(&ids, false).unwrap(), case["decoded"].as_str().unwrap());
    }
    assert_eq!(lm.tokenizer.eos_ids.first(), Some(&2));
}

/// Logits within 5e-4 of transformers on the dequantized weights. Both sides multiply the same
/// f32 numbers and differ only in summation order over 30 layers (logits of magnitude ~20, so
/// f32 rounding alone reaches ~1e-5 relative); measured worst case 5.5e-5, printed by the test.
#[test]
fn logits_match_transformers() {
    let lm = require_decoder!();
    let ctx = ForwardCtx::eval();
    let mut worst = 0f32;
    for case in reference()["cases"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let h = lm.model.forward(&t, None, None, &ctx).unwrap();
        let logits = lm.model.logits(&h, &ctx).unwrap().squeeze(0).unwrap();
        let rows = logits.to_vec2::<f32>().unwrap();
        worst = worst.max(check_against(&rows, case, case["prompt"].as_str().unwrap()));
    }
    eprintln!("worst logit difference vs transformers: {worst:.2e}");
    assert!(worst < 5e-4, "worst logit difference {worst}");
}

/// The cached step-by-step path equals one full forward (the cache is exact).
#[test]
fn kv_cache_equals_full_forward() {
    let lm = require_decoder!();
    let ctx = ForwardCtx::eval();
    let ids: Vec<u32> = lm.tokenizer.encode("The capital of France is Paris, and").unwrap();
    let full = {
        let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        lm.model.logits(&lm.model.forward(&t, None, None, &ctx).unwrap(), &ctx).unwrap()
    };
    let mut cache = KvCache::new(lm.model.num_layers());
    let split = 5;
    let first = Tensor::new(&ids[..split], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    lm.model.forward(&first, None, Some(&mut cache), &ctx).unwrap();
    for (n, &id) in ids[split..].iter().enumerate() {
        let t = Tensor::new(&[id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let h = lm.model.forward(&t, None, Some(&mut cache), &ctx).unwrap();
        let step = lm.model.logits(&last_position(&h).unwrap(), &ctx).unwrap();
        let want = full.narrow(1, split + n, 1).unwrap().squeeze(1).unwrap();
        let d = (step - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-3, "cached step {n} differs by {d}");
    }
    assert_eq!(cache.len(), ids.len());
}

#[test]
fn greedy_generation_matches_transformers() {
    let lm = require_decoder!();
    let cases = reference();
    for case in cases["cases"].as_array().unwrap().iter().take(3) {
        let want = ids_of(&case["greedy"]);
        let opts = GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
        let mut streamed = String::new();
        let g = generate(lm, &ids_of(&case["ids"]), &opts, &mut |s| streamed.push_str(s)).unwrap();
        // transformers stops at the end-of-turn token too; compare the common part.
        let n = g.tokens.len().min(want.len());
        assert_eq!(&g.tokens[..n], &want[..n], "greedy continuation of {:?}", case["prompt"]);
        assert_eq!(streamed, g.text, "streamed text equals the final text");
    }
}

/// Streaming decodes incrementally; a stop string spanning several tokens cuts the text before
/// it, and what was streamed is exactly the final text.
#[test]
fn stop_strings_cut_the_streamed_text() {
    let lm = require_decoder!();
    let reference = reference();
    for (case, stop) in [(0, "answer is"), (2, "solar system"), (3, "AI,")] {
        let c = &reference["cases"][case];
        let full = c["greedy_text"].as_str().unwrap();
        let want = &full[..full.find(stop).unwrap()];
        let opts = GenerateOptions { max_new_tokens: 16, stop_strings: vec![stop.into()], ..Default::default() };
        let mut streamed = String::new();
        let g = generate(lm, &ids_of(&c["ids"]), &opts, &mut |s| streamed.push_str(s)).unwrap();
        assert_eq!((g.text.as_str(), g.stop_reason.as_str()), (want, "stop"), "case {case}");
        assert_eq!(streamed, want);
    }
}

#[test]
fn sampling_is_seeded_and_respects_top_k() {
    let lm = require_decoder!();
    let ids = lm.tokenizer.encode("Once upon a time").unwrap();
    let opts = GenerateOptions { max_new_tokens: 6, temperature: 0.8, top_p: 0.9, top_k: 40, seed: 7, ..Default::default() };
    let a = generate(lm, &ids, &opts, &mut |_| {}).unwrap();
    let b = generate(lm, &ids, &opts, &mut |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    // top_k = 1 is greedy whatever the temperature.
    let k1 = GenerateOptions { top_k: 1, ..opts.clone() };
    let greedy = GenerateOptions { temperature: 0.0, ..opts.clone() };
    assert_eq!(generate(lm, &ids, &k1, &mut |_| {}).unwrap().tokens, generate(lm, &ids, &greedy, &mut |_| {}).unwrap().tokens);
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let lm = require_decoder!();
    let ids = vec![42u32; lm.model.config.max_position_embeddings + 1];
    let e = generate(lm, &ids, &GenerateOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("8192") && e.contains("--prompt"), "{e}");
}

#[test]
fn bad_gguf_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Not GGUF at all.
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, b"hello world, not a model").unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("x.gguf") && e.contains("GGUF"), "{e}");
    // Unsupported version.
    let mut v1 = b"GGUF".to_vec();
    v1.extend(1u32.to_le_bytes());
    v1.extend([0u8; 32]);
    std::fs::write(&p, &v1).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("version 1"), "{e}");
    let Some(real) = decoder_file() else { return };
    // Truncated: the first 20 MB of the real file.
    let bytes = std::fs::read(&real).unwrap();
    std::fs::write(&p, &bytes[..20 << 20]).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("x.gguf"), "{e}");
    let e = LlamaModel::load(&p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    // An unknown tensor type id: patch the type field of the first tensor in the directory.
    let mut patched = bytes.clone();
    let name = b"token_embd.weight";
    let at = patched.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // n_dims (u32) + dims (2 x u64), then the type (u32).
    let ty = at + 4 + 16;
    patched[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&p, &patched).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("unsupported tensor type") || e.contains("99"), "{e}");
    // GGUF tokenizer built without tokenizer.json.
    let t = LmTokenizer::from_gguf(&GgufFile::open(&real).unwrap()).unwrap();
    assert_eq!(t.vocab_size(), 49152);
}

mod deltas {
    use super::*;
    use deltatune::attach::{self, AttachOptions};
    use deltatune::delta::DeltaSpec;
    use deltatune::train::lm::{batch_nll, encode_pair, make_batch, train, LmPair, LmTrainConfig};

    /// LoRA, (IA)³ and LN tuning attach by HF names to the quantized decoder; at their identity
    /// initialisation the logits are unchanged.
    #[test]
    fn identity_initialised_deltas_leave_logits_unchanged() {
        let Some(mut lm) = fresh() else { return };
        let before = logits_of(&lm, "The quick brown fox");
        let specs = [
            DeltaSpec::parse_cli("lora:r=8,lora_alpha=16,target=q_proj+v_proj").unwrap(),
            DeltaSpec::parse_cli("ia3:target=k_proj+v_proj+down_proj,feedforward_modules=down_proj").unwrap(),
            DeltaSpec::parse_cli("ln_tuning:target=input_layernorm").unwrap(),
        ];
        attach::attach(&mut lm.model, &specs, AttachOptions::default()).unwrap();
        let n = attach::count_trainable(&lm.model);
        // LoRA: 30 layers x (q: 8x(576+576) + v: 8x(576+192)); IA3: 30 x (192 + 192 + 1536); LN: 30 x 576.
        assert_eq!(n, 30 * (8 * (576 + 576) + 8 * (576 + 192)) + 30 * (192 + 192 + 1536) + 30 * 576);
        let after = logits_of(&lm, "The quick brown fox");
        assert!(max_diff(&before, &after) < 1e-4, "identity deltas changed logits by {}", max_diff(&before, &after));
        let tree = lm.model.tree().render();
        assert!(tree.contains("lora") && tree.contains("q_proj"), "{tree}");
    }

    /// Gradients flow through the frozen quantized layers to every LoRA matrix, and a few steps
    /// on one completion lower its loss.
    #[test]
    fn lora_trains_through_the_quantized_base() {
        let Some(mut lm) = fresh() else { return };
        let spec = DeltaSpec::parse_cli("lora:r=4,lora_alpha=8,target=q_proj+v_proj,layers=26-29").unwrap();
        attach::attach(&mut lm.model, &[spec], AttachOptions { seed: 3, tokenizer: None }).unwrap();
        let pair = LmPair { prompt: "Review: a wonderful, moving film\nSentiment:".into(), completion: " positive".into() };
        let batch = make_batch(&[encode_pair(&lm.tokenizer, &pair, 64).unwrap()], 2, &Device::Cpu).unwrap();
        let ctx = ForwardCtx::eval();
        let before = batch_nll(&lm.model, &batch, &ctx).unwrap().to_scalar::<f32>().unwrap();
        let grads = batch_nll(&lm.model, &batch, &ctx).unwrap().backward().unwrap();
        let vars = attach::trainable_vars(&lm.model);
        assert_eq!(vars.len(), 4 * 2 * 2);
        for (name, v) in &vars {
            let g = grads.get(v).unwrap_or_else(|| panic!("no gradient for {name}"));
            // B starts at zero, so A's gradient is zero at step 0; B's must not be.
            if name.ends_with("lora_B") {
                let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(s > 0.0, "zero gradient for {name}");
            }
        }
        let cfg = LmTrainConfig { epochs: 4, batch_size: 1, lr: 5e-3, warmup_ratio: 0.0, ..Default::default() };
        let log = train(&lm.model, &[], &lm.tokenizer, &[pair.clone()], &cfg, &deltatune::api::Control::silent()).unwrap();
        assert_eq!(log.len(), 4);
        let after = batch_nll(&lm.model, &batch, &ctx).unwrap().to_scalar::<f32>().unwrap();
        assert!(after < before * 0.8, "loss {before} -> {after}");
    }

    /// The block engine (one op per layer in training) against the module-by-module path on the
    /// real quantized decoder with the deltas `specs` on it, every trained tensor moved off its
    /// initial value (so LoRA's B is not zero, (IA)³'s scales not one, BitFit's biases not zero),
    /// two rows of different lengths (padding). The module-by-module path is forced by routing
    /// every row to every delta (the engine declines routed batches; the maths is the same). Loss
    /// and every gradient agree; the engine's own timers show that it ran. The number of trained
    /// tensors is `count`.
    fn engine_against_modules(specs: &[&str], count: usize) {
        use deltatune::core::RowRoute;
        let Some(mut lm) = fresh() else {
            eprintln!("SKIP block engine test: decoder unavailable");
            return;
        };
        let specs: Vec<_> = specs.iter().map(|s| DeltaSpec::parse_cli(s).unwrap()).collect();
        attach::attach(&mut lm.model, &specs, AttachOptions { seed: 7, tokenizer: None }).unwrap();
        let vars = attach::trainable_vars(&lm.model);
        assert_eq!(vars.len(), count, "{:?}", vars.iter().map(|v| &v.0).collect::<Vec<_>>());
        for (i, (_, v)) in vars.iter().enumerate() {
            let n = v.elem_count();
            let step: Vec<f32> = (0..n).map(|j| ((j * 7 + i * 13) % 17) as f32 * 0.004 - 0.032).collect();
            let step = Tensor::from_vec(step, v.dims(), &Device::Cpu).unwrap();
            v.set(&(v.as_tensor() + step).unwrap()).unwrap();
        }
        let pairs = [
            LmPair { prompt: "Review: a wonderful, moving film\nSentiment:".into(), completion: " positive".into() },
            LmPair { prompt: "Review: dull\nSentiment:".into(), completion: " negative".into() },
        ];
        let rows: Vec<_> = pairs.iter().map(|p| encode_pair(&lm.tokenizer, p, 64).unwrap()).collect();
        let batch = make_batch(&rows, 2, &Device::Cpu).unwrap();
        let train = ForwardCtx { train: true, ..ForwardCtx::eval() };
        let route = specs.iter().fold(RowRoute::new(2), |r, s| r.with(s.name.clone(), 0, 2));
        let routed = ForwardCtx { route: Some(&route), ..train.clone() };
        let guard = crate::common::profile_lock();
        deltatune::ops::profile::set_enabled(true);
        let run = |ctx: &ForwardCtx| {
            let loss = batch_nll(&lm.model, &batch, ctx).unwrap();
            let grads = loss.backward().unwrap();
            (loss.to_scalar::<f32>().unwrap(), grads)
        };
        let (l1, g1) = run(&train);
        let engine_ran = deltatune::ops::profile::take().iter().any(|e| e.op == "decoder-linear" && e.phase == "bwd");
        deltatune::ops::profile::set_enabled(false);
        drop(guard);
        assert!(engine_ran, "the block engine did not run");
        let (l2, g2) = run(&routed);
        assert!((l1 - l2).abs() <= 1e-5 * l2.abs(), "loss {l1} (engine) vs {l2} (module by module)");
        for (n, v) in &vars {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0, "zero gradient for {n}");
            let d = max_diff(a, b);
            assert!(d <= 1e-4 * scale, "{n}: gradients differ by {d:e} (scale {scale:e})");
        }
    }

    /// LoRA on all seven maps of the top three layers.
    #[test]
    fn block_engine_matches_the_module_path_on_the_decoder() {
        engine_against_modules(&["lora:r=4,lora_alpha=8,target=q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj,layers=27-29"], 3 * 7 * 2);
    }

    /// (IA)³ with its defaults (outputs of k and v, input of down), BitFit on every map (biases
    /// added to a Llama layer) and LayerNorm tuning of both norms, in the top two layers, with a
    /// LoRA on o.
    #[test]
    fn block_engine_matches_the_module_path_with_ia3_bitfit_and_norms() {
        engine_against_modules(
            &[
                "ia3:layers=28-29",
                "bitfit:target=q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj,layers=28-29",
                "ln_tuning:target=input_layernorm+post_attention_layernorm,layers=28-29",
                "lora:r=2,target=o_proj,layers=28-29",
            ],
            2 * (3 + 7 + 2 + 2),
        );
    }

    /// Bottleneck adapters after both blocks of the top two layers: Houlsby's (sequential, swish)
    /// and the parallel adapter, each with a LoRA on q.
    #[test]
    fn block_engine_matches_the_module_path_with_adapters() {
        engine_against_modules(&["houlsby:init_weights=bert,layers=28-29", "lora:r=2,target=q_proj,layers=28-29"], 2 * (2 * 4 + 2));
        engine_against_modules(&["parallel_adapter:init_weights=bert,layers=28-29"], 2 * 4);
    }

    /// DoRA with dropout (its contribution as one weight update on the dropped input) on q and
    /// down of the top two layers; LoRA with dropout on v, up and down.
    #[test]
    fn block_engine_matches_the_module_path_with_dropout() {
        engine_against_modules(&["dora:r=2,lora_dropout=0.1,target=q_proj+down_proj,layers=28-29"], 2 * 2 * 3);
        // LoRA with its dropout: the low-rank update on the dropped input.
        engine_against_modules(&["lora:r=2,lora_dropout=0.1,target=v_proj+up_proj+down_proj,layers=28-29"], 2 * 3 * 2);
    }

    /// Prefix tuning (keys and values before the sequence's in every layer's attention) with a
    /// LoRA on q and v of the top layers.
    #[test]
    fn block_engine_matches_the_module_path_with_a_prefix() {
        engine_against_modules(&["prefix:num_virtual_tokens=4", "lora:r=2,target=q_proj+v_proj,layers=28-29"], 1 + 2 * 2 * 2);
    }
}

/// Prefix tuning (keys and values in the attention cache) and prompt tuning (soft tokens before
/// the embeddings) on the decoder.
mod prompt_learning {
    use super::*;
    use deltatune::attach::{self, AttachOptions};
    use deltatune::delta::DeltaSpec;
    use deltatune::train::lm::{batch_nll, encode_pair, make_batch, train, LmPair, LmTrainConfig};

    /// The fixture's deterministic table: scale * sin(freq * i + phase), in f64 rounded to f32.
    fn table(rows: usize, cols: usize, scale: f64, freq: f64, phase: f64) -> Tensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| (scale * (freq * i as f64 + phase).sin()) as f32).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn attach_one(lm: &mut CausalLm, spec: &str) -> candle_core::Var {
        attach::attach(&mut lm.model, &[DeltaSpec::parse_cli(spec).unwrap()], AttachOptions::default()).unwrap();
        let vars = attach::trainable_vars(&lm.model);
        assert_eq!(vars.len(), 1, "{vars:?}");
        vars[0].1.clone()
    }

    fn forward_ids(lm: &CausalLm, ids: &[u32]) -> Tensor {
        let t = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let ctx = ForwardCtx::eval();
        lm.model.logits(&lm.model.forward(&t, None, None, &ctx).unwrap(), &ctx).unwrap().squeeze(0).unwrap()
    }

    /// With PEFT's own tables set to the same values, our prefix and prompt tuning give PEFT's
    /// logits (tables laid out as PEFT's: the prefix width is num_key_value_heads × head_dim).
    #[test]
    fn prefix_and_prompt_match_peft() {
        let reference = reference();
        let ids = ids_of(&reference["cases"][0]["ids"]);
        for (kind, rows) in [("prefix", 3 * 30 * 2 * 192), ("prompt", 3 * 576)] {
            let Some(mut lm) = fresh() else { return };
            let var = attach_one(&mut lm, &format!("{kind}:num_virtual_tokens=3"));
            assert_eq!(var.elem_count(), rows, "{kind} parameters");
            let t = match kind {
                "prefix" => table(3, 30 * 2 * 192, 0.5, 0.13, 0.0),
                _ => table(3, 576, 0.05, 0.37, 1.0),
            };
            var.set(&t).unwrap();
            let logits = forward_ids(&lm, &ids).to_vec2::<f32>().unwrap();
            assert_eq!(logits.len(), ids.len());
            let worst = check_against(&logits, &reference["deltas"][kind], kind);
            eprintln!("{kind}: worst logit difference vs PEFT {worst:.2e}");
            assert!(worst < 5e-4, "{kind}: worst logit difference {worst}");
        }
    }

    /// A soft prompt equal to the embeddings of tokens X, or a prefix equal to X's cached keys and
    /// values, makes the model score Y exactly as it scores Y after the real tokens X.
    #[test]
    fn virtual_tokens_act_as_the_tokens_they_copy() {
        let Some(base) = lm() else { return };
        let x: Vec<u32> = base.tokenizer.encode("Review: a wonderful film.").unwrap();
        let y: Vec<u32> = base.tokenizer.encode(" Sentiment: positive").unwrap();
        let xy: Vec<u32> = x.iter().chain(&y).copied().collect();
        let want = forward_ids(base, &xy).narrow(0, x.len(), y.len()).unwrap();
        let n = x.len();
        // Prompt: the embedding rows of X.
        {
            let Some(mut lm) = fresh() else { return };
            let var = attach_one(&mut lm, &format!("prompt:num_virtual_tokens={n}"));
            let emb = deltatune::Backbone::word_embeddings(&lm.model).unwrap();
            var.set(&emb.index_select(&Tensor::new(x.as_slice(), &Device::Cpu).unwrap(), 0).unwrap()).unwrap();
            let d = max_diff(&forward_ids(&lm, &y), &want);
            assert!(d < 1e-3, "prompt: {d}");
        }
        // Prefix: X's keys and values from a cache, laid out as the prefix table (P, L·2·w).
        {
            let mut cache = KvCache::new(base.model.num_layers());
            let t = Tensor::new(x.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            base.model.forward(&t, None, Some(&mut cache), &ForwardCtx::eval()).unwrap();
            let rows = |t: &Tensor| t.squeeze(0).unwrap(); // (1, n, nkv·d) -> (n, 192)
            let mut blocks = Vec::new();
            for l in 0..30 {
                let (k, v) = cache.layer(l).unwrap();
                blocks.push(rows(k));
                blocks.push(rows(v));
            }
            let Some(mut lm) = fresh() else { return };
            let var = attach_one(&mut lm, &format!("prefix:num_virtual_tokens={n}"));
            var.set(&Tensor::cat(&blocks, 1).unwrap()).unwrap();
            let d = max_diff(&forward_ids(&lm, &y), &want);
            assert!(d < 1e-3, "prefix: {d}");
        }
    }

    /// With a prefix and a prompt attached, cached generation steps equal one full forward, a
    /// padded batch scores its real rows as unpadded ones, and the generation context shrinks by
    /// the virtual tokens.
    #[test]
    fn cache_and_padding_with_virtual_tokens() {
        let Some(mut lm) = fresh() else { return };
        let specs = [
            DeltaSpec::parse_cli("prefix:num_virtual_tokens=4").unwrap(),
            DeltaSpec::parse_cli("prompt:num_virtual_tokens=2,prompt_tuning_init=random_uniform,init_range=0.05").unwrap(),
        ];
        attach::attach(&mut lm.model, &specs, AttachOptions { seed: 9, tokenizer: None }).unwrap();
        assert_eq!(lm.model.num_virtual_tokens(), 6);
        let ctx = ForwardCtx::eval();
        let ids: Vec<u32> = lm.tokenizer.encode("The capital of France is Paris, and").unwrap();
        let full = forward_ids(&lm, &ids);
        let mut cache = KvCache::new(lm.model.num_layers());
        let split = 4;
        let first = Tensor::new(&ids[..split], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        lm.model.forward(&first, None, Some(&mut cache), &ctx).unwrap();
        assert_eq!((cache.virtual_tokens(), cache.len()), (6, 6 + split));
        let mut worst = 0f32;
        for (n, &id) in ids[split..].iter().enumerate() {
            let t = Tensor::new(&[id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let h = lm.model.forward(&t, None, Some(&mut cache), &ctx).unwrap();
            let step = lm.model.logits(&last_position(&h).unwrap(), &ctx).unwrap().squeeze(0).unwrap();
            let d = max_diff(&step, &full.get(split + n).unwrap());
            worst = worst.max(d);
        }
        // Summation-order noise only (one-row products against whole-sequence ones; the N(0, 1)
        // prefix keys give larger attention scores than real keys): a misplaced position or mask
        // moves logits by whole units.
        eprintln!("worst cached-step difference {worst:.2e}");
        assert!(worst < 5e-3, "cached steps differ by {worst}");
        // Right-padded batch of two: the short row's real positions match its own forward.
        let short = &ids[..5];
        let mut padded = short.to_vec();
        padded.resize(ids.len(), 0);
        let batch = Tensor::new(vec![ids.clone(), padded], &Device::Cpu).unwrap();
        let mut mask = vec![vec![1u32; ids.len()], vec![0u32; ids.len()]];
        mask[1][..5].fill(1);
        let mask = Tensor::new(mask, &Device::Cpu).unwrap();
        let h = lm.model.forward(&batch, Some(&mask), None, &ctx).unwrap();
        let logits = lm.model.logits(&h, &ctx).unwrap();
        assert!(max_diff(&logits.get(0).unwrap(), &full) < 1e-3);
        let d = max_diff(&logits.get(1).unwrap().narrow(0, 0, 5).unwrap(), &forward_ids(&lm, short));
        assert!(d < 1e-3, "padded row differs by {d}");
        // The context left for generation excludes the virtual tokens.
        let long = vec![ids[0]; lm.model.config.max_position_embeddings - 3];
        let err = generate(&lm, &long, &GenerateOptions::default(), &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("6 virtual tokens"), "{err}");
    }

    /// Gradients reach the prefix and prompt tables through the frozen quantized layers, and a
    /// few steps on one completion lower its loss.
    #[test]
    fn prefix_and_prompt_train() {
        for (spec, lr) in [("prefix:num_virtual_tokens=4", 1e-2), ("prompt:num_virtual_tokens=4", 3e-2)] {
            let Some(mut lm) = fresh() else { return };
            let var = attach_one(&mut lm, spec);
            let pair = LmPair { prompt: "Review: a wonderful, moving film\nSentiment:".into(), completion: " positive".into() };
            let batch = make_batch(&[encode_pair(&lm.tokenizer, &pair, 64).unwrap()], 2, &Device::Cpu).unwrap();
            let ctx = ForwardCtx::eval();
            let loss = batch_nll(&lm.model, &batch, &ctx).unwrap();
            let before = loss.to_scalar::<f32>().unwrap();
            let g = loss.backward().unwrap();
            let gs = g.get(&var).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(gs > 0.0, "{spec}: zero gradient");
            let cfg = LmTrainConfig { epochs: 4, batch_size: 1, lr, warmup_ratio: 0.0, ..Default::default() };
            train(&lm.model, &[], &lm.tokenizer, &[pair.clone()], &cfg, &deltatune::api::Control::silent()).unwrap();
            let after = batch_nll(&lm.model, &batch, &ctx).unwrap().to_scalar::<f32>().unwrap();
            assert!(after < before * 0.8, "{spec}: loss {before} -> {after}");
        }
    }
}

/// Chat-formatted training data and packing.
mod chat_and_packing {
    use super::*;
    use deltatune::train::lm::{make_row_batch, read_jsonl, training_rows, LmPair, LmTrainConfig, END_OF_TURN};

    #[test]
    fn conversations_and_pairs_go_through_the_chat_template() {
        let Some(lm) = lm() else { return };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("chat.jsonl");
        std::fs::write(
            &f,
            [
                r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}"#,
                r#"{"prompt": "2+2?", "completion": "4"}"#,
                r#"{"text": "plain text stays plain"}"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let pairs = read_jsonl(&f, Some(&lm.tokenizer)).unwrap();
        assert_eq!(pairs[0].prompt, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(pairs[0].completion, format!("Hello.{END_OF_TURN}"));
        // A pair becomes one user turn after the template's default system message.
        assert!(pairs[1].prompt.starts_with("<|im_start|>system\n") && pairs[1].prompt.ends_with("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"));
        assert_eq!(pairs[2], LmPair { prompt: String::new(), completion: "plain text stays plain".into() });
        // The end of turn is one special token, the last target.
        let ids = lm.tokenizer.encode(&pairs[0].completion).unwrap();
        assert_eq!(ids.last().copied(), lm.tokenizer.encode(END_OF_TURN).unwrap().first().copied());
        assert_eq!(lm.tokenizer.encode(END_OF_TURN).unwrap().len(), 1);
        // Without --chat a conversation is an error naming the line; so are malformed ones.
        for (line, want) in [
            (r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}"#, "chat template"),
            (r#"{"messages": [{"role": "user", "content": "Hi"}]}"#, "end with an assistant turn"),
            (r#"{"messages": [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}"#, "role `bot`"),
        ] {
            std::fs::write(&f, line).unwrap();
            let chat = (!want.contains("template")).then_some(&lm.tokenizer);
            let e = read_jsonl(&f, chat).unwrap_err().to_string();
            assert!(e.contains("chat.jsonl") && e.contains(":1") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn packing_fills_rows_and_keeps_the_targets() {
        let Some(lm) = lm() else { return };
        let pairs: Vec<LmPair> = (0..9)
            .map(|i| LmPair { prompt: format!("Question {i}: what comes next?"), completion: format!(" The answer is {i}.") })
            .collect();
        let padded = training_rows(&lm.tokenizer, &pairs, &LmTrainConfig { max_length: 32, ..Default::default() }).unwrap();
        let packed = training_rows(&lm.tokenizer, &pairs, &LmTrainConfig { max_length: 32, pack: true, ..Default::default() }).unwrap();
        let tokens: usize = padded.iter().map(|r| r.ids.len()).sum();
        // One end-of-sequence separator per example, then cut into rows of 32.
        assert_eq!(packed.iter().map(|r| r.ids.len()).sum::<usize>(), tokens + pairs.len());
        assert_eq!(packed.len(), (tokens + pairs.len()).div_ceil(32));
        assert!(packed[..packed.len() - 1].iter().all(|r| r.ids.len() == 32));
        let eos = lm.tokenizer.eos_ids[0];
        let targets = |rows: &[deltatune::train::lm::LmRow]| rows.iter().map(|r| r.target.iter().filter(|&&t| t).count()).sum::<usize>();
        // Every completion token stays a target, and each separator after a completion is one.
        assert_eq!(targets(&packed), targets(&padded) + pairs.len());
        assert!(packed.iter().flat_map(|r| r.ids.iter().zip(&r.target)).filter(|(&i, _)| i == eos).all(|(_, &t)| t));
        // A packed batch has no padding; targets at a row's first token have no position.
        let batch = make_row_batch(&packed[..2], 0, &Device::Cpu).unwrap();
        assert_eq!(batch.mask.sum_all().unwrap().to_scalar::<f32>().unwrap(), 64.0);
        let first_targets = packed[..2].iter().filter(|r| r.target[0]).count();
        assert_eq!(batch.num_targets, targets(&packed[..2]) - first_targets);
    }
}

mod interop {
    use super::*;
    use deltatune::attach::{self, AttachOptions};
    use deltatune::delta::DeltaSpec;
    use deltatune::artifacts::peft;
    use deltatune::train::lm::{train, LmPair, LmTrainConfig};

    /// A LoRA trained on the quantized decoder exports with PEFT's Llama key names and loads back
    /// onto a fresh copy of the model with identical logits.
    #[test]
    fn lora_exports_with_peft_llama_keys_and_round_trips() {
        let Some(mut a) = fresh() else { return };
        let spec = DeltaSpec::parse_cli("lora:r=4,lora_alpha=8,target=q_proj+v_proj,layers=28-29").unwrap();
        attach::attach(&mut a.model, &[spec.clone()], AttachOptions { seed: 5, tokenizer: None }).unwrap();
        let pair = LmPair { prompt: "2 + 2 =".into(), completion: " 4".into() };
        let cfg = LmTrainConfig { epochs: 2, batch_size: 1, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        train(&a.model, &[], &a.tokenizer, &[pair], &cfg, &deltatune::api::Control::silent()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        peft::export(&out, &a.model, &spec, "HuggingFaceTB/SmolLM2-135M-Instruct", &Default::default()).unwrap();
        let st = deltatune::io::TensorFile::load(&out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let names: Vec<&str> = st.names().collect();
        for k in [
            "base_model.model.model.layers.28.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight",
        ] {
            assert!(names.contains(&k), "{k} not in {names:?}");
        }
        assert_eq!(names.len(), 2 * 2 * 2);
        let mut b = fresh().unwrap();
        peft::load(&out, &mut b.model, None).unwrap();
        let text = "Numbers: 2 + 2 = 4";
        let d = max_diff(&logits_of(&a, text), &logits_of(&b, text));
        assert!(d < 1e-5, "round-tripped LoRA changes logits by {d}");
    }
}

mod merge {
    use super::*;
    use deltatune::attach::{self, AttachOptions};
    use deltatune::delta::DeltaSpec;
    use deltatune::train::lm::{train, LmPair, LmTrainConfig};

    /// LoRA + LN tuning trained on the quantized GGUF model, merged into an f32 HF directory: the
    /// directory loads as an ordinary safetensors Llama (our HF loader) with the same tokenizer
    /// and the same logits as the unmerged model.
    #[test]
    fn merged_hf_directory_equals_the_unmerged_model() {
        let Some(mut a) = fresh() else { return };
        let specs = [
            DeltaSpec::parse_cli("lora:r=4,lora_alpha=8,target=q_proj+v_proj+down_proj,layers=27-29").unwrap(),
            DeltaSpec::parse_cli("ln_tuning:target=post_attention_layernorm,layers=29").unwrap(),
        ];
        attach::attach(&mut a.model, &specs, AttachOptions { seed: 9, tokenizer: None }).unwrap();
        let pair = LmPair { prompt: "The sky is".into(), completion: " green today".into() };
        let cfg = LmTrainConfig { epochs: 2, batch_size: 1, lr: 1e-2, warmup_ratio: 0.0, ..Default::default() };
        train(&a.model, &[], &a.tokenizer, &[pair], &cfg, &deltatune::api::Control::silent()).unwrap();
        let text = "The sky is blue and the grass";
        let ids = a.tokenizer.encode(text).unwrap();
        let before = logits_of(&a, text);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        let merged = deltatune::artifacts::write_merged_decoder(&mut a.model, &out, candle_core::DType::F32, Some(&a.tokenizer)).unwrap();
        assert_eq!(merged, 3 * 3 + 1);
        for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            assert!(out.join(file).is_file(), "{file} missing");
        }
        let b = CausalLm::load(&out, &Device::Cpu).unwrap();
        assert!(matches!(b.model.source, deltatune::backbone::llama::LlamaSource::Safetensors { .. }));
        assert_eq!(b.model.num_params(), 134_515_008);
        assert_eq!(b.tokenizer.encode(text).unwrap(), ids);
        assert_eq!(b.tokenizer.eos_ids.first(), Some(&2));
        let d = max_diff(&before, &logits_of(&b, text));
        assert!(d < 2e-4, "merged model differs by {d}");
        eprintln!("merged vs unmerged logits: max |diff| {d:.2e}");
    }
}

/// A delta trained for another architecture (a BERT LoRA) is refused with both backbones named.
#[test]
fn delta_for_another_architecture_is_a_clear_error() {
    use deltatune::attach::{self, AttachOptions};
    use deltatune::artifacts::delta_dir as store;
    use deltatune::delta::DeltaSpec;
    let Some(bert_dir) = crate::common::model_dir() else { return };
    let Some(mut lm) = fresh() else { return };
    let mut bert = deltatune::BertModel::load(&bert_dir, &Device::Cpu).unwrap();
    let spec = DeltaSpec::parse_cli("lora:r=2,target=query+value").unwrap();
    attach::attach(&mut bert, &[spec.clone()], AttachOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert-lora");
    store::save(&out, &bert, &[spec], &Default::default(), &Default::default()).unwrap();
    let e = deltatune::artifacts::load_delta(&out, &mut lm.model, AttachOptions::default()).unwrap_err().to_string();
    assert!(e.contains("bert") && e.contains("llama") && e.contains("bert-lora"), "{e}");
}
