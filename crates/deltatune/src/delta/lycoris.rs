//! What LoHa and LoKr share, as PEFT's `tuners/lycoris_utils.py` does: per-module overrides of
//! rank and alpha ([`Pattern`], PEFT's `rank_pattern` / `alpha_pattern`), rank dropout (rows of
//! the weight update dropped while training) and module dropout (the whole update skipped for a
//! step), and how their config numbers are written back to PEFT's JSON.

use super::peft_fields::PeftIn;
use crate::core::HookCtx;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};

/// Per-module overrides keyed by a regex over the module path, in the order given. PEFT's rule
/// (`utils/other.py`, `get_pattern_key`): the first key `K` with the full module path matching
/// `(.*\.)?(K)$` wins; no match keeps the config-wide value.
#[derive(Clone, Debug, PartialEq)]
pub struct Pattern<T>(pub Vec<(String, T)>);

impl<T> Default for Pattern<T> {
    fn default() -> Self {
        Pattern(Vec::new())
    }
}

impl<T: Copy> Pattern<T> {
    /// The value for module `path`, or `default`. `field` names the pattern in errors.
    pub fn lookup(&self, path: &str, default: T, field: &str) -> Result<T> {
        for (key, value) in &self.0 {
            if key_regex(key, field)?.is_match(path) {
                return Ok(*value);
            }
        }
        Ok(default)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks every key compiles and every value passes `ok` (`what` says what a value must be).
    pub fn check(&self, method: &str, field: &str, ok: impl Fn(&T) -> bool, what: &str) -> Result<()>
    where
        T: std::fmt::Debug,
    {
        for (key, value) in &self.0 {
            key_regex(key, field)?;
            if !ok(value) {
                return Err(Error::Delta(format!("{method}: {field} entry `{key}` is {value:?}; it must be {what}")));
            }
        }
        Ok(())
    }
}

fn key_regex(key: &str, field: &str) -> Result<regex::Regex> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| Error::Delta(format!("{field} key `{key}` is not a valid pattern: {e}")))
}

impl<T: Serialize> Serialize for Pattern<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Pattern<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Pattern<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping module-name patterns to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Pattern(out))
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(Pattern(Vec::new()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A number as PEFT writes it: an integer when it is one (`alpha: 8`), else a float.
pub fn peft_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// An alpha pattern as PEFT's JSON.
pub fn alpha_json(p: &Pattern<f64>) -> Value {
    Value::Object(p.0.iter().map(|(k, v)| (k.clone(), peft_number(*v))).collect())
}

/// A rank pattern as PEFT's JSON.
pub fn rank_json(p: &Pattern<usize>) -> Value {
    Value::Object(p.0.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

/// Checks a dropout probability named `field`.
pub fn check_prob(method: &str, field: &str, p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Delta(format!("{method}: {field} {p} is not in [0, 1)")));
    }
    Ok(())
}

/// Module dropout: whether this training step skips the whole update (PEFT applies the update
/// when `rand > module_dropout`).
pub fn module_dropped(h: &HookCtx, p: f32) -> bool {
    h.train && p > 0.0 && h.key.derive("module_dropout").uniform(0) <= p
}

/// Rank dropout on a weight update `dw` (out, in) while training: each output row is kept with
/// probability `1 - p`; with `rescale` the kept rows are divided by the kept fraction (PEFT's
/// `drop /= drop.mean()`; LoHa always, LoKr with `rank_dropout_scale`).
pub fn rank_dropout(dw: Tensor, h: &HookCtx, p: f32, rescale: bool, device: &Device) -> Result<Tensor> {
    if !h.train || p <= 0.0 {
        return Ok(dw);
    }
    let rows = dw.dim(0)?;
    let key = h.key.derive("rank_dropout");
    let mut mask: Vec<f32> = (0..rows as u64).map(|i| if key.uniform(i) > p { 1.0 } else { 0.0 }).collect();
    let kept: f32 = mask.iter().sum();
    if rescale && kept > 0.0 {
        let m = rows as f32 / kept;
        mask.iter_mut().for_each(|x| *x *= m);
    }
    let mask = Tensor::from_vec(mask, (rows, 1), device)?.to_dtype(dw.dtype())?;
    Ok(dw.broadcast_mul(&mask)?)
}

/// A PEFT pattern field (absent or null: empty).
pub fn pattern<T: serde::de::DeserializeOwned>(p: &PeftIn, key: &str) -> Result<Pattern<T>> {
    match p.obj.get(key) {
        None | Some(Value::Null) => Ok(Pattern::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| p.bad(format!("`{key}`: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_follows_peft_matching_and_order() {
        let p: Pattern<usize> = serde_json::from_str(r#"{"intermediate.dense": 24, "dense": 4, "layer\\.0\\..*query": 3}"#).unwrap();
        assert_eq!(p.lookup("encoder.layer.0.intermediate.dense", 8, "rank_pattern").unwrap(), 24);
        assert_eq!(p.lookup("encoder.layer.0.output.dense", 8, "rank_pattern").unwrap(), 4);
        // A key must match a whole dotted suffix.
        assert_eq!(p.lookup("encoder.layer.0.attention.self.xdense", 8, "rank_pattern").unwrap(), 8);
        assert_eq!(p.lookup("encoder.layer.0.attention.self.query", 8, "rank_pattern").unwrap(), 3);
        assert_eq!(p.lookup("encoder.layer.10.attention.self.query", 8, "rank_pattern").unwrap(), 8);
        // Order is kept through serde.
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"intermediate.dense":24,"dense":4,"layer\\.0\\..*query":3}"#);
        let bad: Pattern<usize> = serde_json::from_str(r#"{"(": 2}"#).unwrap();
        let e = bad.lookup("x", 1, "rank_pattern").unwrap_err().to_string();
        assert!(e.contains("rank_pattern key `(`"), "{e}");
    }
}
