//! `deltatune generate`: text from a decoder LM with a key-value cache, streamed to stdout.

use crate::args::GenerateArgs;
use anyhow::{Context, Result};
use deltatune::lm::{generate, CausalLm, GenerateOptions};
use deltatune::{assets, Device};
use std::io::Write;

pub fn run(a: GenerateArgs) -> Result<()> {
    let path = match &a.model {
        Some(p) => p.clone(),
        None => assets::default_decoder(&mut super::progress)?,
    };
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        anyhow::bail!("invalid --top-p: {} (expected a value in (0, 1])", a.top_p);
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        anyhow::bail!("invalid --temperature: {} (expected 0 for greedy or a positive number)", a.temperature);
    }
    let mut lm = CausalLm::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
    lm.model.set_exact(a.exact);
    if let Some(d) = &a.delta {
        let loaded = deltatune::tuned::load_delta(d, &mut lm.model, Default::default())?;
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
    }
    let prompt = match (&a.prompt, &a.chat) {
        (Some(p), _) => p.clone(),
        (None, Some(user)) => {
            let mut msgs: Vec<(&str, &str)> = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(("system", s));
            }
            msgs.push(("user", user));
            lm.tokenizer.chat_prompt(&msgs)?
        }
        (None, None) => anyhow::bail!("give --prompt or --chat"),
    };
    let ids = lm.tokenizer.encode(&prompt)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop_ids: Vec::new(),
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
    };
    let stream = !a.json;
    let mut stdout = std::io::stdout();
    let g = generate(&lm, &ids, &opts, &mut |piece| {
        if stream {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&g)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens in {:.2} s; {} new tokens at {:.1} tokens/s; stop: {}]",
            g.prompt_tokens,
            g.prefill_seconds,
            g.tokens.len(),
            g.tokens_per_second,
            g.stop_reason
        );
    }
    Ok(())
}
