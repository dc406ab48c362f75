//! `deltatune setup`: fetch the default model and demo data (idempotent).

use crate::args::SetupArgs;
use anyhow::Result;
use deltatune::assets;

pub fn run(a: SetupArgs) -> Result<()> {
    let home = assets::home()?;
    let mut out = serde_json::Map::new();
    out.insert("home".into(), home.display().to_string().into());
    if !a.data_only {
        let p = assets::ensure(&home, &assets::DEFAULT_MODEL, &mut |m: &str| eprintln!("{m}"))?;
        out.insert("model".into(), p.display().to_string().into());
    }
    if let Some(which) = a.decoder.as_deref() {
        let p = match which {
            "gemma3" => assets::gemma3(&mut |m: &str| eprintln!("{m}"))?,
            _ => assets::default_decoder(&mut |m: &str| eprintln!("{m}"))?,
        };
        out.insert("decoder".into(), p.display().to_string().into());
    }
    if !a.model_only {
        let p = assets::ensure(&home, &assets::DEMO_DATA, &mut |m: &str| eprintln!("{m}"))?;
        out.insert("data".into(), p.display().to_string().into());
    }
    if a.json {
        println!("{}", serde_json::Value::Object(out));
    } else {
        for (k, v) in out {
            println!("{k}: {}", v.as_str().unwrap_or_default());
        }
    }
    Ok(())
}
