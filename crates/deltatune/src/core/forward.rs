//! What one forward pass carries ([`ForwardCtx`]) and returns ([`ModelOutput`]), and pooling of
//! token states into one vector per sequence.

use crate::error::{Error, Result};
use crate::ops::DropoutKey;
use candle_core::{IndexOp, Tensor, D};

/// Per-forward settings shared by every site.
#[derive(Clone, Debug)]
pub struct ForwardCtx<'a> {
    /// Training mode: dropout active.
    pub train: bool,
    /// Root of all dropout randomness for this forward (derive it from seed and step).
    pub key: DropoutKey,
    /// Gate values of gated deltas (structure search), shape (n_gates,).
    pub gates: Option<&'a Tensor>,
    /// Collect every layer's hidden states in [`ModelOutput::hidden_states`].
    pub output_hidden_states: bool,
    /// Mixed-delta batches: which delta groups run on which rows. `None` runs every active delta
    /// on every row (the single-model behaviour).
    pub route: Option<&'a RowRoute>,
    /// No gradient will be taken of this forward (generation, serving): hooks may compute without
    /// recording a graph. [`ForwardCtx::eval`] leaves it off, since evaluation-mode forwards are
    /// also differentiated (gradient checks, the structure search).
    pub inference: bool,
}

/// Which delta groups apply to which rows of a batch (serving several deltas in one pass). Each
/// group covers a contiguous range of rows; a group not listed applies to no row. Row-local hooks
/// (`pre`, `post`) run on their rows only; hooks that change the whole computation (`reparam`,
/// soft prompts, prefixes) are allowed only for a group that covers every row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowRoute {
    /// Rows in the batch.
    pub batch: usize,
    /// (group name, first row, number of rows).
    pub groups: Vec<(String, usize, usize)>,
}

impl RowRoute {
    /// A route for `batch` rows with no delta on any row (the bare backbone).
    pub fn new(batch: usize) -> Self {
        RowRoute { batch, groups: Vec::new() }
    }

    /// Applies group `name` to rows `start..start + len`.
    pub fn with(mut self, name: impl Into<String>, start: usize, len: usize) -> Self {
        self.groups.push((name.into(), start, len));
        self
    }

    /// The rows of group `name`, if it applies to any.
    pub fn rows_of(&self, name: &str) -> Option<(usize, usize)> {
        self.groups.iter().find(|(n, _, _)| n == name).map(|(_, s, l)| (*s, *l))
    }

    /// Checks that every range lies inside the batch.
    pub fn check(&self, batch: usize) -> Result<()> {
        if batch != self.batch {
            return Err(Error::Delta(format!("row route is for {} rows but the batch has {batch}", self.batch)));
        }
        for (n, s, l) in &self.groups {
            if *l == 0 || s + l > batch {
                return Err(Error::Delta(format!("row route: group `{n}` covers rows {s}..{} of a batch of {batch}", s + l)));
            }
        }
        Ok(())
    }
}

impl<'a> ForwardCtx<'a> {
    /// Evaluation mode: no dropout, no gates.
    pub fn eval() -> Self {
        ForwardCtx { train: false, key: DropoutKey(0), gates: None, output_hidden_states: false, route: None, inference: false }
    }

    /// Evaluation mode for a forward that is never differentiated (see [`ForwardCtx::inference`]).
    pub fn inference() -> Self {
        ForwardCtx { inference: true, ..Self::eval() }
    }

    /// Training mode with dropout drawn from `key`.
    pub fn train(key: DropoutKey) -> Self {
        ForwardCtx { train: true, key, gates: None, output_hidden_states: false, route: None, inference: false }
    }

    pub fn with_gates(mut self, gates: &'a Tensor) -> Self {
        self.gates = Some(gates);
        self
    }

    /// Runs each delta group on its rows only (see [`RowRoute`]).
    pub fn with_route(mut self, route: &'a RowRoute) -> Self {
        self.route = Some(route);
        self
    }

    pub fn with_hidden_states(mut self) -> Self {
        self.output_hidden_states = true;
        self
    }
}

/// What a backbone forward returns.
#[derive(Clone, Debug)]
pub struct ModelOutput {
    /// (b, v + t, h): `v` soft-prompt positions first, then the real tokens.
    pub last_hidden_state: Tensor,
    /// (b, v + t) 0/1 mask matching `last_hidden_state`.
    pub attention_mask: Tensor,
    /// Number of soft-prompt positions at the front.
    pub num_virtual: usize,
    /// Embedding output and each layer's output (when requested), each (b, v + t, h).
    pub hidden_states: Vec<Tensor>,
}

/// How to turn token states into one vector per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first real token (`[CLS]`/`<s>`).
    Cls,
    /// Mask-aware mean over the real tokens (soft-prompt positions excluded).
    Mean,
}

impl std::str::FromStr for Pooling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            other => Err(Error::arg("--pooling", format!("`{other}` (expected `mean` or `cls`)"))),
        }
    }
}

impl ModelOutput {
    /// Pools the real tokens into (b, h).
    pub fn pool(&self, pooling: Pooling) -> Result<Tensor> {
        let t = self.last_hidden_state.dim(1)?;
        let v = self.num_virtual;
        match pooling {
            Pooling::Cls => Ok(self.last_hidden_state.i((.., v))?),
            Pooling::Mean => {
                let h = self.last_hidden_state.narrow(1, v, t - v)?;
                let m = self.attention_mask.narrow(1, v, t - v)?.to_dtype(h.dtype())?;
                mean_pool(&h, &m)
            }
        }
    }
}

/// Mask-aware mean (sentence-transformers): `sum_t h[t] m[t] / max(sum_t m[t], 1e-9)`.
pub fn mean_pool(h: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(D::Minus1)?;
    let sum = h.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

/// L2-normalises rows of (b, h).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

