//! `deltatune generate`: text from a decoder LM with a key-value cache, streamed to stdout.

use crate::args::GenerateArgs;
use anyhow::Result;
use deltatune::api::{self, GenerateSpec, Prompt};
use deltatune::lm::GenerateOptions;
use std::io::Write;

pub fn run(a: GenerateArgs) -> Result<()> {
    let prompt = match (&a.prompt, &a.chat) {
        (Some(p), _) => Prompt::Text(p.clone()),
        (None, Some(user)) => Prompt::Chat { system: a.system.clone(), user: user.clone() },
        (None, None) => anyhow::bail!("give --prompt or --chat"),
    };
    let spec = GenerateSpec {
        model: a.model.clone(),
        delta: a.delta.clone(),
        prompt,
        options: GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
            stop_ids: Vec::new(),
            stop_strings: a.stop.clone(),
            ignore_eos: a.ignore_eos,
        },
        exact: a.exact,
    };
    let stream = !a.json;
    let mut stdout = std::io::stdout();
    let g = super::with_control(false, None, |ctl| {
        api::generate(&spec, ctl, &mut |piece| {
            if stream {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        })
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
