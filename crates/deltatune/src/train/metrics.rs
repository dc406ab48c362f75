//! Evaluation metrics, computed exactly (counts in integers, sums in f64): accuracy, binary F1,
//! macro-F1, Matthews correlation, Pearson and Spearman. Conventions follow scikit-learn / SciPy
//! defaults except where a value is undefined: there we return 0.0 instead of NaN or a warning, so
//! that model selection can always compare two numbers. Inputs that do not fit together (different
//! lengths, no examples, class predictions for a regression task) are errors, not panics.

use crate::data::task::{Label, MetricKind};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// A model's predictions for an evaluation split.
#[derive(Clone, Debug, PartialEq)]
pub enum Predictions {
    /// Predicted class indices (argmax of the logits).
    Classes(Vec<usize>),
    /// Predicted regression values.
    Scores(Vec<f32>),
}

fn err(metric: &str, msg: impl Into<String>) -> Error {
    Error::Metric { metric: metric.to_string(), msg: msg.into() }
}

fn check_lengths(metric: &str, pred: usize, gold: usize) -> Result<()> {
    if pred != gold {
        return Err(err(metric, format!("{pred} predictions for {gold} gold labels")));
    }
    if gold == 0 {
        return Err(err(metric, "no examples to score"));
    }
    Ok(())
}

/// Computes `kind` on `preds` against `gold`. Classification metrics need
/// [`Predictions::Classes`] and [`Label::Class`] gold labels; Pearson/Spearman need
/// [`Predictions::Scores`] and [`Label::Real`].
pub fn compute(kind: MetricKind, preds: &Predictions, gold: &[Label]) -> Result<f64> {
    let name = kind.name();
    match (kind, preds) {
        (MetricKind::Pearson | MetricKind::Spearman, Predictions::Scores(p)) => {
            let g = gold
                .iter()
                .map(|l| l.real().map(f64::from).ok_or_else(|| err(name, "gold labels are classes, not real values")))
                .collect::<Result<Vec<f64>>>()?;
            let p: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
            if kind == MetricKind::Pearson {
                pearson(&p, &g)
            } else {
                spearman(&p, &g)
            }
        }
        (MetricKind::Pearson | MetricKind::Spearman, Predictions::Classes(_)) => {
            Err(err(name, "needs real-valued predictions (a regression task)"))
        }
        (_, Predictions::Classes(p)) => {
            let g = gold
                .iter()
                .map(|l| l.class().ok_or_else(|| err(name, "gold labels are real values, not classes")))
                .collect::<Result<Vec<usize>>>()?;
            match kind {
                MetricKind::Accuracy => accuracy(p, &g),
                MetricKind::F1 => binary_f1(p, &g),
                MetricKind::MacroF1 => macro_f1(p, &g),
                _ => matthews(p, &g),
            }
        }
        (_, Predictions::Scores(_)) => Err(err(name, "needs class predictions (a classification task)")),
    }
}

/// Every metric of `kinds`, in order.
pub fn compute_all(kinds: &[MetricKind], preds: &Predictions, gold: &[Label]) -> Result<Vec<(MetricKind, f64)>> {
    kinds.iter().map(|&k| Ok((k, compute(k, preds, gold)?))).collect()
}

/// Fraction of predictions equal to the gold class.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> Result<f64> {
    check_lengths("accuracy", pred.len(), gold.len())?;
    let correct = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    Ok(correct as f64 / gold.len() as f64)
}

/// Per-class counts: (true positives, predicted, gold) for every class in gold ∪ predictions.
fn class_counts(pred: &[usize], gold: &[usize]) -> BTreeMap<usize, (u64, u64, u64)> {
    let mut m: BTreeMap<usize, (u64, u64, u64)> = BTreeMap::new();
    for (&p, &g) in pred.iter().zip(gold) {
        m.entry(p).or_default().1 += 1;
        let e = m.entry(g).or_default();
        e.2 += 1;
        if p == g {
            e.0 += 1;
        }
    }
    m
}

/// F1 from counts: 2·TP / (predicted + gold) — the harmonic mean of precision and recall written
/// without the two divisions, so a class with no predictions (precision 0/0) gets 0 like sklearn's
/// default `zero_division`. 0 when the class is absent from both.
fn f1(tp: u64, predicted: u64, gold: u64) -> f64 {
    if predicted + gold == 0 {
        0.0
    } else {
        2.0 * tp as f64 / (predicted + gold) as f64
    }
}

/// F1 of class 1 (the positive class) against all other classes. 0 when neither the gold labels
/// nor the predictions contain class 1 (sklearn's default `zero_division`).
pub fn binary_f1(pred: &[usize], gold: &[usize]) -> Result<f64> {
    check_lengths("f1", pred.len(), gold.len())?;
    let (tp, predicted, actual) = class_counts(pred, gold).get(&1).copied().unwrap_or_default();
    Ok(f1(tp, predicted, actual))
}

/// Unweighted mean of per-class F1 over the classes that occur in the gold labels or the
/// predictions (sklearn's `f1_score(average="macro")` with its default label set). A class that
/// is only predicted, or never predicted, contributes 0 (`zero_division = 0`).
pub fn macro_f1(pred: &[usize], gold: &[usize]) -> Result<f64> {
    check_lengths("macro_f1", pred.len(), gold.len())?;
    let counts = class_counts(pred, gold);
    let sum: f64 = counts.values().map(|&(tp, p, g)| f1(tp, p, g)).sum();
    Ok(sum / counts.len() as f64)
}

/// Matthews correlation coefficient, in the multiclass form sklearn uses (Gorodkin's R_K):
/// `(c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))` with `c` correct predictions, `s`
/// examples, `p_k` / `t_k` predicted / true counts of class k. For two classes this is the usual
/// `(TP·TN − FP·FN) / sqrt(...)`. 0 when the denominator is 0 (e.g. one class predicted for all).
pub fn matthews(pred: &[usize], gold: &[usize]) -> Result<f64> {
    check_lengths("matthews", pred.len(), gold.len())?;
    let counts = class_counts(pred, gold);
    let s = gold.len() as f64;
    let c: f64 = counts.values().map(|&(tp, _, _)| tp as f64).sum();
    let pt: f64 = counts.values().map(|&(_, p, t)| p as f64 * t as f64).sum();
    let pp: f64 = counts.values().map(|&(_, p, _)| (p as f64).powi(2)).sum();
    let tt: f64 = counts.values().map(|&(_, _, t)| (t as f64).powi(2)).sum();
    let denom = ((s * s - pp) * (s * s - tt)).sqrt();
    Ok(if denom == 0.0 { 0.0 } else { (c * s - pt) / denom })
}

fn check_finite(metric: &str, x: &[f64], y: &[f64]) -> Result<()> {
    check_lengths(metric, x.len(), y.len())?;
    if let Some(i) = x.iter().chain(y).position(|v| !v.is_finite()) {
        let (which, i) = if i < x.len() { ("prediction", i) } else { ("gold value", i - x.len()) };
        return Err(err(metric, format!("{which} {i} is not a finite number")));
    }
    Ok(())
}

fn pearson_unchecked(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    let denom = (sxx * syy).sqrt();
    if denom == 0.0 {
        0.0
    } else {
        (sxy / denom).clamp(-1.0, 1.0)
    }
}

/// Pearson correlation. 0 when either side is constant (SciPy returns NaN there).
pub fn pearson(pred: &[f64], gold: &[f64]) -> Result<f64> {
    check_finite("pearson", pred, gold)?;
    Ok(pearson_unchecked(pred, gold))
}

/// 1-based ranks; tied values share the average of the ranks they span (SciPy's `rankdata`
/// default, `method="average"`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < idx.len() {
        let mut end = start + 1;
        while end < idx.len() && x[idx[end]] == x[idx[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end, averaged.
        let avg = (start + 1 + end) as f64 / 2.0;
        for &i in &idx[start..end] {
            ranks[i] = avg;
        }
        start = end;
    }
    ranks
}

/// Spearman rank correlation: Pearson on average ranks. 0 when either side is constant.
pub fn spearman(pred: &[f64], gold: &[f64]) -> Result<f64> {
    check_finite("spearman", pred, gold)?;
    Ok(pearson_unchecked(&average_ranks(pred), &average_ranks(gold)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn accuracy_by_hand() {
        // 3 of 5 equal (positions 0, 1, 3).
        close(accuracy(&[0, 1, 1, 0, 2], &[0, 1, 0, 0, 1]).unwrap(), 0.6);
    }

    #[test]
    fn binary_f1_by_hand() {
        // TP = 2 (pos 0, 3), FP = 1 (pos 1), FN = 1 (pos 4): P = R = 2/3, F1 = 2/3.
        close(binary_f1(&[1, 1, 0, 1, 0, 0], &[1, 0, 0, 1, 1, 0]).unwrap(), 2.0 / 3.0);
        // No positives anywhere: 0 by the zero-division convention.
        close(binary_f1(&[0, 0], &[0, 0]).unwrap(), 0.0);
        // Positives only in gold: recall 0, precision 0/0 -> 0, F1 0.
        close(binary_f1(&[0, 0], &[1, 0]).unwrap(), 0.0);
    }

    #[test]
    fn macro_f1_by_hand() {
        // gold 0 0 1 1 2 2 / pred 0 1 1 1 0 2:
        // class 0: TP 1, predicted 2, gold 2 -> 2/4; class 1: TP 2, 3, 2 -> 4/5; class 2: TP 1, 1, 2 -> 2/3.
        // mean = (1/2 + 4/5 + 2/3) / 3 = 59/90.
        close(macro_f1(&[0, 1, 1, 1, 0, 2], &[0, 0, 1, 1, 2, 2]).unwrap(), 59.0 / 90.0);
        // Class 2 only predicted: F1 0 but it counts: (1 + 2/3 + 0) / 3 = 5/9 (as sklearn).
        close(macro_f1(&[0, 0, 1, 2], &[0, 0, 1, 1]).unwrap(), 5.0 / 9.0);
    }

    #[test]
    fn matthews_by_hand() {
        // Binary, TP 2, TN 2, FP 1, FN 1: (2·2 − 1·1) / sqrt(3·3·3·3) = 3/9.
        close(matthews(&[1, 1, 0, 0, 0, 1], &[1, 1, 1, 0, 0, 0]).unwrap(), 1.0 / 3.0);
        // 3 classes, gold 0 1 2 0 1 2 / pred 0 2 1 0 0 2: c = 3, s = 6, t = (2, 2, 2), p = (3, 1, 2);
        // (3·6 − (6 + 2 + 4)) / sqrt((36 − 14)(36 − 12)) = 6 / sqrt(528).
        close(matthews(&[0, 2, 1, 0, 0, 2], &[0, 1, 2, 0, 1, 2]).unwrap(), 6.0 / 528f64.sqrt());
        // Perfect and inverted.
        close(matthews(&[0, 1, 1], &[0, 1, 1]).unwrap(), 1.0);
        close(matthews(&[1, 0], &[0, 1]).unwrap(), -1.0);
        // One class predicted for everything: denominator 0 -> 0.
        close(matthews(&[1, 1, 1], &[0, 1, 1]).unwrap(), 0.0);
        // Gold all one class: also 0.
        close(matthews(&[0, 1, 1], &[1, 1, 1]).unwrap(), 0.0);
    }

    #[test]
    fn pearson_by_hand() {
        // x − 3 = (−2, −1, 0, 1, 2), y − 4 = (−2, 0, 1, 0, 1): Σ = 6, Σx² = 10, Σy² = 6 -> 6/sqrt(60).
        close(pearson(&[1., 2., 3., 4., 5.], &[2., 4., 5., 4., 5.]).unwrap(), 6.0 / 60f64.sqrt());
        close(pearson(&[1., 2., 3.], &[3., 2., 1.]).unwrap(), -1.0);
        close(pearson(&[1., 1., 1.], &[1., 2., 3.]).unwrap(), 0.0);
    }

    #[test]
    fn spearman_with_ties_by_hand() {
        // y = 2 4 5 4 5 -> ranks 1, 2.5, 4.5, 2.5, 4.5 (ties averaged); x ranks 1..5.
        // ry − 3 = (−2, −0.5, 1.5, −0.5, 1.5): Σ(rx−3)(ry−3) = 4 + 0.5 + 0 − 0.5 + 3 = 7,
        // Σ(rx−3)² = 10, Σ(ry−3)² = 9 -> 7 / sqrt(90).
        assert_eq!(average_ranks(&[2., 4., 5., 4., 5.]), vec![1.0, 2.5, 4.5, 2.5, 4.5]);
        close(spearman(&[1., 2., 3., 4., 5.], &[2., 4., 5., 4., 5.]).unwrap(), 7.0 / 90f64.sqrt());
        // Monotone but not linear: 1.
        close(spearman(&[1., 2., 3., 4.], &[1., 8., 27., 64.]).unwrap(), 1.0);
        close(spearman(&[2., 2., 2.], &[1., 2., 3.]).unwrap(), 0.0);
    }

    #[test]
    fn compute_checks_inputs() {
        let gold = [Label::Class(1), Label::Class(0)];
        let p = Predictions::Classes(vec![1, 1]);
        close(compute(MetricKind::Accuracy, &p, &gold).unwrap(), 0.5);
        let all = compute_all(&[MetricKind::F1, MetricKind::Matthews], &p, &gold).unwrap();
        assert_eq!(all[0].0, MetricKind::F1);
        close(all[0].1, 2.0 / 3.0);
        let e = compute(MetricKind::Accuracy, &Predictions::Classes(vec![1]), &gold).unwrap_err();
        assert_eq!(e.to_string(), "metric accuracy: 1 predictions for 2 gold labels");
        let e = compute(MetricKind::Pearson, &p, &gold).unwrap_err();
        assert_eq!(e.to_string(), "metric pearson: needs real-valued predictions (a regression task)");
        let e = compute(MetricKind::Spearman, &Predictions::Scores(vec![1.0, 2.0]), &gold).unwrap_err();
        assert_eq!(e.to_string(), "metric spearman: gold labels are classes, not real values");
        let e = compute(MetricKind::Pearson, &Predictions::Scores(vec![]), &[]).unwrap_err();
        assert_eq!(e.to_string(), "metric pearson: no examples to score");
        let real = [Label::Real(1.0), Label::Real(2.0)];
        let e = compute(MetricKind::Pearson, &Predictions::Scores(vec![1.0, f32::NAN]), &real).unwrap_err();
        assert_eq!(e.to_string(), "metric pearson: prediction 1 is not a finite number");
        close(compute(MetricKind::Spearman, &Predictions::Scores(vec![0.1, 0.3]), &real).unwrap(), 1.0);
    }
}
