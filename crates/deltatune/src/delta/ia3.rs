//! (IA)³ (Liu et al., 2022), addition family: learned rescaling vectors. Follows PEFT
//! (`tuners/ia3/layer.py`): a feed-forward module scales its input, `y = (l ⊙ x) W^T + b`, any
//! other module scales its output including the bias, `y = l ⊙ (x W^T + b)`; vectors start at 1.
//! PEFT decides "feed-forward" with a plain suffix test (`key.endswith(entry)`, no dot boundary),
//! so its BERT default `output.dense` marks both `attention.output.dense` and the FFN
//! `output.dense` as feed-forward; we reproduce that for parity. Mergeable exactly.

use super::method::{site_dims, BuildCtx, Family, Method};
use super::peft_fields::{PeftIn, PeftOut, PEFT_VERSION};
use super::targets::{is_decoder, targets, TargetModules, Targets};
use crate::core::init;
use crate::core::{Delta, EngineHook, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ia3Config {
    /// Modules whose input (not output) is scaled. PEFT semantics: a list entry matches any path
    /// ending with it (no dot boundary); a string is a full-match regex; `None`: the backbone's
    /// default (`output.dense` for BERT, `down_proj` for decoders), as PEFT resolves it.
    pub feedforward_modules: Option<TargetModules>,
    /// Initialise vectors to ones (a no-op at start). False: N(0,1) (PEFT's debugging option).
    pub init_ia3_weights: bool,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Ia3Config { feedforward_modules: None, init_ia3_weights: true }
    }
}

impl Ia3Config {
    /// The feed-forward module list in effect on a backbone of `model_type`.
    pub fn feedforward_for(&self, model_type: &str) -> TargetModules {
        self.feedforward_modules.clone().unwrap_or_else(|| {
            let default = if is_decoder(model_type) { "down_proj" } else { "output.dense" };
            TargetModules::List(vec![default.into()])
        })
    }

    pub fn is_feedforward(&self, path: &str, model_type: &str) -> Result<bool> {
        Ok(match self.feedforward_for(model_type) {
            TargetModules::List(l) => l.iter().any(|e| path.ends_with(e.as_str())),
            TargetModules::Regex(r) => regex::Regex::new(&format!("^(?:{r})$"))
                .map_err(|e| Error::Delta(format!("ia3: feedforward_modules regex `{r}`: {e}")))?
                .is_match(path),
        })
    }
}

impl Method for Ia3Config {
    const FAMILY: Family = Family::Addition;
    const PEFT_TYPE: Option<&'static str> = Some("IA3");

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING for bert and llama; Phi-3
        // (fused projections, no PEFT default) scales the fused qkv output and the down input.
        if model_type == "phi3" {
            targets(&["qkv_proj", "down_proj"])
        } else if is_decoder(model_type) {
            targets(&["k_proj", "v_proj", "down_proj"])
        } else {
            targets(&["key", "value", "output.dense"])
        }
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        let cfg = Ia3Config { feedforward_modules: p.modules("feedforward_modules")?, init_ia3_weights: true };
        let mut t = p.targets()?;
        // PEFT's IA3 has no layer restriction.
        t.layers_to_transform = None;
        Ok((cfg, t))
    }

    fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
        if targets.layers_to_transform.is_some() {
            return Err(Error::Delta("PEFT's IA3 has no layers_to_transform; cannot export a layer-restricted IA3".into()));
        }
        let (target_modules, exclude_modules) = p.target_fields(targets, &self.default_targets(p.model_type));
        Ok(json!({
            "auto_mapping": null, "base_model_name_or_path": p.base_model,
            "exclude_modules": exclude_modules, "fan_in_fan_out": false,
            "feedforward_modules": PeftOut::modules(&self.feedforward_for(p.model_type)), "inference_mode": true,
            "init_ia3_weights": self.init_ia3_weights, "modules_to_save": p.modules_to_save, "peft_type": "IA3",
            "peft_version": PEFT_VERSION, "revision": null, "target_modules": target_modules,
            "task_type": "FEATURE_EXTRACTION"
        }))
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (inp, out) = site_dims(site, &ctx.info)?;
        let feedforward = self.is_feedforward(site.path(), &ctx.model_type)?;
        let shape = if feedforward { vec![1, inp] } else { vec![out, 1] };
        let l = if self.init_ia3_weights {
            init::ones(&shape, &ctx.device)?
        } else {
            ctx.stream(site.path(), "ia3_l").normal(&shape, 0.0, 1.0, &ctx.device)?
        };
        Ok(Box::new(Ia3 { l: Var::from_tensor(&l)?, feedforward }))
    }
}

#[derive(Debug)]
pub struct Ia3 {
    l: Var, // (out, 1) or (1, in)
    feedforward: bool,
}

impl Ia3 {
    /// The scaling vector as (n,), interpolated towards 1 by the gate: `1 + z (l - 1)`.
    fn vector(&self, h: &HookCtx) -> Result<Tensor> {
        let l = self.l.as_tensor().flatten_all()?;
        match &h.gate {
            Some(_) => Ok(h.gated((l - 1.0)?)?.affine(1.0, 1.0)?),
            None => Ok(l),
        }
    }
}

impl Delta for Ia3 {
    fn method(&self) -> &'static str {
        "ia3"
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("ia3_l".into(), self.l.clone())]
    }

    fn pre(&self, x: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        if !self.feedforward {
            return Ok(None);
        }
        Ok(Some(crate::ops::scale_last(x, &self.vector(h)?)?))
    }

    fn post(&self, _x: &Tensor, y: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        if self.feedforward {
            return Ok(None);
        }
        Ok(Some(crate::ops::scale_last(y, &self.vector(h)?)?))
    }

    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        let l = self.vector(h)?;
        Ok(Some(if self.feedforward { EngineHook::ScaleIn(l) } else { EngineHook::ScaleOut(l) }))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let l = self.l.as_tensor();
        let mut out = Vec::new();
        for (name, t) in base {
            match (name.as_str(), self.feedforward) {
                // (out, in) * (1, in): scales columns.
                ("weight", true) => out.push((name.clone(), t.broadcast_mul(l)?)),
                // (out, in) * (out, 1): scales rows; the bias is scaled too.
                ("weight", false) => out.push((name.clone(), t.broadcast_mul(l)?)),
                ("bias", false) => out.push((name.clone(), t.mul(&l.flatten_all()?)?)),
                _ => {}
            }
        }
        Ok(Some(out))
    }
}
