//! Prefix tuning (Li & Liang, 2021), addition family: per layer, `num_virtual_tokens` learned keys
//! and values prepended to the self-attention's own. Follows PEFT's `PrefixEncoder`: one table
//! `prompt_embeddings` (P, L·2·w) where, for layer l, columns [2lw, 2lw+w) are the keys and
//! [2lw+w, 2(l+1)w) the values (already projected; N(0,1) init). `w` is the key width: the hidden
//! size, or `num_key_value_heads × head_dim` under grouped-query attention (PEFT's `token_dim`);
//! each row holds the heads in order. With `prefix_projection`, the table is produced during
//! training by `embedding (P, w) → Linear(w, E) → tanh → Linear(E, 2Lw)` (Li & Liang's
//! reparameterization). Attaches to the layer stack (BERT's `encoder`, a decoder's `model`), where
//! the keys act as an attention cache of P positions: real tokens' position ids start at P, and a
//! decoder's keys are used as given (no rotary embedding), as with transformers' cache (PEFT
//! behaviour). Not mergeable.

use super::method::{BuildCtx, Family, Method};
use super::peft_fields::PeftIn;
use super::targets::{is_decoder, targets, Targets};
use crate::core::{BackboneInfo, Delta, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    /// Train through a two-layer MLP (reparameterization) instead of the table directly.
    pub prefix_projection: bool,
    /// Hidden width E of the MLP; `None`: the model's hidden size (PEFT's default).
    pub encoder_hidden_size: Option<usize>,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig { num_virtual_tokens: 10, prefix_projection: false, encoder_hidden_size: None }
    }
}

impl Method for PrefixConfig {
    const FAMILY: Family = Family::Addition;
    const ALIASES: &'static [&'static str] = &["prefix_tuning"];
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("tokens", "num_virtual_tokens"), ("n", "num_virtual_tokens")];
    const PEFT_TYPE: Option<&'static str> = Some("PREFIX_TUNING");

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Encoder]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // The layer stack: BERT's `encoder`, a decoder's `model`.
        targets(&[if is_decoder(model_type) { "model" } else { "encoder" }])
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return Err(Error::Delta("prefix: num_virtual_tokens must be at least 1".into()));
        }
        Ok(())
    }

    fn gateable(&self) -> bool {
        false
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        // PEFT's token_dim for prefixes is the key width (grouped-query attention:
        // num_key_value_heads × head_dim).
        p.check_dims(p.info.kv_width())?;
        // PEFT saves the (projected) table only, so it always loads as a plain table.
        let cfg = PrefixConfig { num_virtual_tokens: p.usize("num_virtual_tokens")?, prefix_projection: false, encoder_hidden_size: None };
        Ok((cfg, Targets::default()))
    }

    /// PEFT stores the table without a module path.
    fn peft_key(&self, _site: &str, param: &str) -> String {
        param.to_string()
    }

    fn param_estimate(&self, _inp: usize, _out: usize, info: &BackboneInfo) -> Option<u128> {
        let (n, kv, h) = (self.num_virtual_tokens as u128, info.kv_width() as u128, info.hidden_size as u128);
        let table = n * info.num_layers as u128 * 2 * kv;
        let mlp = self.encoder_hidden_size.unwrap_or(info.kv_width()) as u128 * (h + 1 + info.num_layers as u128 * 2 * kv);
        Some(table + if self.prefix_projection { n * h + mlp } else { 0 })
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (p, h, l, dev) = (self.num_virtual_tokens, ctx.info.kv_width(), ctx.info.num_layers, ctx.device.clone());
        let path = site.path();
        let table = if self.prefix_projection {
            let e = self.encoder_hidden_size.unwrap_or(h);
            let lin = |tag: &str, inp: usize, out: usize| -> Result<(Var, Var)> {
                let w = ctx.stream(path, &format!("{tag}.weight")).kaiming_uniform(&[out, inp], inp, &dev)?;
                let b = ctx.stream(path, &format!("{tag}.bias")).kaiming_uniform(&[out], inp, &dev)?;
                Ok((Var::from_tensor(&w)?, Var::from_tensor(&b)?))
            };
            Table::Projected {
                embedding: Var::from_tensor(&ctx.stream(path, "embedding").normal(&[p, h], 0.0, 1.0, &dev)?)?,
                first: lin("transform.0", h, e)?,
                second: lin("transform.2", e, 2 * l * h)?,
            }
        } else {
            Table::Direct(Var::from_tensor(&ctx.stream(path, "prompt_embeddings").normal(&[p, 2 * l * h], 0.0, 1.0, &dev)?)?)
        };
        Ok(Box::new(Prefix { table, tokens: p, hidden: h }))
    }
}

#[derive(Debug)]
enum Table {
    /// (P, 2Lw) trained directly.
    Direct(Var),
    /// embedding (P, w); first (E, w)+(E); second (2Lw, E)+(2Lw).
    Projected { embedding: Var, first: (Var, Var), second: (Var, Var) },
}

#[derive(Debug)]
pub struct Prefix {
    table: Table,
    tokens: usize,
    /// Key width w.
    hidden: usize,
}

impl Prefix {
    /// This layer's (P, 2w) block of keys and values.
    fn layer_block(&self, layer: usize) -> Result<Tensor> {
        let h2 = 2 * self.hidden;
        match &self.table {
            Table::Direct(t) => Ok(t.as_tensor().narrow(1, layer * h2, h2)?),
            Table::Projected { embedding, first, second } => {
                let t = ops::linear(embedding.as_tensor(), first.0.as_tensor(), Some(first.1.as_tensor()))?.tanh()?;
                // Only this layer's rows of the second projection.
                let w = second.0.as_tensor().narrow(0, layer * h2, h2)?;
                let b = second.1.as_tensor().narrow(0, layer * h2, h2)?;
                ops::linear(&t, &w, Some(&b))
            }
        }
    }
}

impl Delta for Prefix {
    fn method(&self) -> &'static str {
        "prefix"
    }

    fn params(&self) -> Vec<(String, Var)> {
        match &self.table {
            Table::Direct(t) => vec![("prompt_embeddings".into(), t.clone())],
            Table::Projected { embedding, first, second } => vec![
                ("embedding.weight".into(), embedding.clone()),
                ("transform.0.weight".into(), first.0.clone()),
                ("transform.0.bias".into(), first.1.clone()),
                ("transform.2.weight".into(), second.0.clone()),
                ("transform.2.bias".into(), second.1.clone()),
            ],
        }
    }

    fn num_virtual_tokens(&self) -> usize {
        self.tokens
    }

    fn prefix(&self, layer: usize, batch: usize, _h: &HookCtx) -> Result<Option<(Tensor, Tensor)>> {
        let block = self.layer_block(layer)?;
        let (p, h) = (self.tokens, self.hidden);
        let k = block.narrow(1, 0, h)?.unsqueeze(0)?.broadcast_as((batch, p, h))?;
        let v = block.narrow(1, h, h)?.unsqueeze(0)?.broadcast_as((batch, p, h))?;
        Ok(Some((k, v)))
    }
}
