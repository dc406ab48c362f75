//! The delta shared by the specification methods that tune a slice of the backbone through
//! additive, zero-initialised updates ([`super::bitfit`], [`super::ln_tuning`]): a fresh delta is
//! an exact no-op, can be gated by the structure search, and merges exactly. Not a method itself.

use crate::core::{Delta, EngineHook, HookCtx};
use crate::error::Result;
use candle_core::{Tensor, Var};

/// `param' = param + z·Δ` for the site's weight and/or bias.
#[derive(Debug)]
pub struct Additive {
    pub method: &'static str,
    pub weight: Option<Var>,
    pub bias: Option<Var>,
}

impl Additive {
    fn delta(&self, name: &str) -> Option<&Var> {
        match name {
            "weight" => self.weight.as_ref(),
            "bias" => self.bias.as_ref(),
            _ => None,
        }
    }
}

impl Delta for Additive {
    fn method(&self) -> &'static str {
        self.method
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        if let Some(w) = &self.weight {
            v.push(("delta_weight".into(), w.clone()));
        }
        if let Some(b) = &self.bias {
            v.push(("delta_bias".into(), b.clone()));
        }
        v
    }

    fn reparam(&self, name: &str, base: Option<&Tensor>, h: &HookCtx) -> Result<Option<Tensor>> {
        let Some(d) = self.delta(name) else { return Ok(None) };
        let d = h.gated(d.as_tensor().clone())?;
        Ok(Some(match base {
            Some(b) => crate::ops::add_frozen(&d, b)?,
            None => d,
        }))
    }

    fn engine_hook(&self, _h: &HookCtx) -> Result<Option<EngineHook>> {
        Ok(Some(EngineHook::Reparam))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let mut out = Vec::new();
        for name in ["weight", "bias"] {
            let Some(d) = self.delta(name) else { continue };
            let merged = match base.iter().find(|(n, _)| n == name) {
                Some((_, t)) => t.add(d.as_tensor())?,
                None => d.as_tensor().copy()?,
            };
            out.push((name.to_string(), merged));
        }
        Ok(Some(out))
    }
}
