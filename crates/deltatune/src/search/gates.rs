//! S3Delta's gates: one architecture parameter α_i per candidate, turned into keep-probabilities by
//! a *shifted global sigmoid*, `p_i = σ((α_i − b)/β)`, where the shift `b` is solved at every step
//! so that the expected number of trainable parameters equals the budget:
//! `Σ_i σ((α_i − b)/β)·n_i = B`. The left side decreases monotonically in `b`, so bisection finds
//! the unique root; `b` is a constant for the gradient (as in the reference), and α only decides
//! where the mass goes. During search, gates are relaxed-Bernoulli samples (logistic noise,
//! temperature τ), one per candidate per step; at selection time the deterministic `p` is used.

use crate::error::{Error, Result};
use crate::ops::DropoutKey;
use candle_core::{Tensor, Var};

/// σ((α − b)/β) in f64.
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Expected parameter count for shift `b`.
pub fn expected(alphas: &[f64], n: &[usize], b: f64, beta: f64) -> f64 {
    alphas.iter().zip(n).map(|(a, &ni)| sigmoid((a - b) / beta) * ni as f64).sum()
}

/// Solves `Σ σ((α_i − b)/β) n_i = budget` for `b` by bisection. Errors when the budget is not in
/// (0, Σ n_i).
pub fn solve_shift(alphas: &[f64], n: &[usize], budget: f64, beta: f64) -> Result<f64> {
    let total: f64 = n.iter().map(|&x| x as f64).sum();
    if !(budget > 0.0 && budget < total) {
        return Err(Error::Delta(format!(
            "budget {budget:.0} must be between 0 and the search space's {total:.0} parameters"
        )));
    }
    let (amin, amax) = alphas.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &a| (lo.min(a), hi.max(a)));
    // At b = amax + 40β every σ < e^-40 (sum ≈ 0); at b = amin − 40β every σ ≈ 1 (sum ≈ total).
    let (mut lo, mut hi) = (amin - 40.0 * beta, amax + 40.0 * beta);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if expected(alphas, n, mid, beta) > budget {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-12 * (1.0 + mid.abs()) {
            break;
        }
    }
    Ok(0.5 * (lo + hi))
}

/// Search hyperparameters of the gates.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GateConfig {
    /// Temperature of the shifted sigmoid.
    pub beta: f64,
    /// Temperature of the relaxed-Bernoulli samples (1 in the reference).
    pub tau: f64,
    /// Rescale p by Σp / stopgrad(Σp): same values, gradients redistribute mass at constant Σp
    /// (the reference's `shift_detach`).
    pub renormalize: bool,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig { beta: 1.0, tau: 1.0, renormalize: true }
    }
}

/// The architecture parameters and their sizes.
pub struct Gates {
    pub alpha: Var,
    pub n: Vec<usize>,
    pub budget: f64,
    pub cfg: GateConfig,
}

impl Gates {
    pub fn new(n: Vec<usize>, budget: f64, cfg: GateConfig, device: &candle_core::Device) -> Result<Self> {
        let alpha = Var::from_tensor(&Tensor::zeros(n.len(), candle_core::DType::F32, device)?)?;
        Ok(Gates { alpha, n, budget, cfg })
    }

    pub fn alphas(&self) -> Result<Vec<f64>> {
        Ok(self.alpha.as_tensor().to_vec1::<f32>()?.into_iter().map(|a| a as f64).collect())
    }

    /// The current shift `b`.
    pub fn shift(&self) -> Result<f64> {
        solve_shift(&self.alphas()?, &self.n, self.budget, self.cfg.beta)
    }

    /// Keep-probabilities p (differentiable in α; `b` constant).
    pub fn probs(&self) -> Result<Tensor> {
        let b = self.shift()?;
        let p = candle_nn::ops::sigmoid(&((self.alpha.as_tensor() - b)? / self.cfg.beta)?)?;
        if self.cfg.renormalize {
            let s = p.sum_all()?;
            Ok(p.broadcast_mul(&s.detach().broadcast_div(&s)?)?)
        } else {
            Ok(p)
        }
    }

    /// Relaxed-Bernoulli gates z = σ((logit u + logit p)/τ), u ~ U(0,1) from `key`.
    pub fn sample(&self, key: DropoutKey) -> Result<Tensor> {
        let p = self.probs()?.clamp(1e-7, 1.0 - 1e-7)?;
        let u: Vec<f32> = (0..self.n.len() as u64).map(|i| key.uniform(i).clamp(1e-7, 1.0 - 1e-7)).collect();
        let lu: Vec<f32> = u.iter().map(|&u| (u / (1.0 - u)).ln()).collect();
        let noise = Tensor::from_vec(lu, self.n.len(), p.device())?;
        let logit_p = (p.log()? - (p.affine(-1.0, 1.0)?).log()?)?;
        Ok(candle_nn::ops::sigmoid(&((noise + logit_p)? / self.cfg.tau)?)?)
    }

    /// Expected trainable parameters under the current p.
    pub fn expected_params(&self) -> Result<f64> {
        let p = self.probs()?.to_vec1::<f32>()?;
        Ok(p.iter().zip(&self.n).map(|(p, &n)| *p as f64 * n as f64).sum())
    }
}

/// Greedy selection: candidates by descending p, each kept if it still fits the remaining budget
/// (knapsack-style: a candidate that does not fit is skipped, smaller ones may follow).
pub fn select(p: &[f64], n: &[usize], budget: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut used = 0f64;
    let mut out = Vec::new();
    for i in order {
        if used + n[i] as f64 <= budget {
            used += n[i] as f64;
            out.push(i);
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn shift_hits_the_budget_within_one_parameter(alphas in proptest::collection::vec(-6.0f64..6.0, 1..80),
                                                      sizes in proptest::collection::vec(1usize..5000, 80),
                                                      frac in 0.001f64..0.999, beta in 0.2f64..3.0) {
            let n = &sizes[..alphas.len()];
            let total: f64 = n.iter().map(|&x| x as f64).sum();
            let budget = frac * total;
            let b = solve_shift(&alphas, n, budget, beta).unwrap();
            let got = expected(&alphas, n, b, beta);
            // Within one parameter's worth of the budget.
            prop_assert!((got - budget).abs() <= 1.0, "expected {got} vs budget {budget}");
        }

        #[test]
        fn greedy_selection_never_exceeds_budget(p in proptest::collection::vec(0.0f64..1.0, 1..60),
                                                 sizes in proptest::collection::vec(1usize..3000, 60), budget in 0.0f64..20000.0) {
            let n = &sizes[..p.len()];
            let chosen = select(&p, n, budget);
            let used: usize = chosen.iter().map(|&i| n[i]).sum();
            prop_assert!(used as f64 <= budget);
            // Greedy is maximal: no unchosen candidate still fits.
            for i in 0..p.len() {
                if !chosen.contains(&i) {
                    prop_assert!(used as f64 + n[i] as f64 > budget);
                }
            }
        }
    }

    #[test]
    fn budget_out_of_range_is_an_error() {
        assert!(solve_shift(&[0.0, 0.0], &[10, 10], 20.0, 1.0).is_err());
        assert!(solve_shift(&[0.0, 0.0], &[10, 10], 0.0, 1.0).is_err());
        // All α = 0: every p = B / Σn.
        let b = solve_shift(&[0.0; 4], &[100; 4], 40.0, 1.0).unwrap();
        assert!((sigmoid(-b) - 0.1).abs() < 1e-9);
    }

    #[test]
    fn gradients_reach_alpha() {
        let g = Gates::new(vec![100, 200, 300], 150.0, GateConfig::default(), &candle_core::Device::Cpu).unwrap();
        let z = g.sample(DropoutKey(3)).unwrap();
        let w = Tensor::new(&[1.0f32, -2.0, 3.0], &candle_core::Device::Cpu).unwrap();
        let grads = z.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = grads.get(&g.alpha).unwrap().to_vec1::<f32>().unwrap();
        assert!(ga.iter().all(|x| x.is_finite()) && ga.iter().any(|x| x.abs() > 1e-6), "{ga:?}");
        let e = g.expected_params().unwrap();
        assert!((e - 150.0).abs() < 1.0, "{e}");
    }
}
