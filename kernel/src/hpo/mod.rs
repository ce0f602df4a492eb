//! FedHPO: hyperparameter search over whole federated courses.
//!
//! A search tries configurations of a course (each a set of `--set`
//! overrides drawn from a [`Space`]) at a fidelity — the number of rounds —
//! and keeps what it learns in `trials.jsonl`. The kernel owns the parts
//! that know nothing of ML:
//!
//! - [`space`]: the search space file, sampling, grids, the unit cube;
//! - [`gp`]: a Gaussian process with expected improvement and posterior
//!   sampling, for Bayesian optimization and Thompson sampling;
//! - [`search`]: the searcher host — a Rhai script (`random`, `grid`, `sha`,
//!   `hyperband`, `bo`, `fts`, `flora`, or a user's file) decides what to
//!   try through `suggest`/`report`, while a pool of workers runs the
//!   trials through the [`TrialRunner`] port; an interrupted search resumes
//!   from its ledger without running a finished trial again.
//!
//! What a trial is — an LLM course sharing one loaded base model, or the
//! numeric least-squares course — is the runner's business
//! (`fedtune_adapters::course::hpo`).

pub mod gp;
pub mod search;
pub mod space;

pub use gp::{expected_improvement, Gp, GpError, Kernel};
pub use search::{
    run_search, Budget, ClientOutcome, Evaluation, HpoError, Objective, OnEvaluation,
    SearchOutcome, SearchSetup, TrialError, TrialJob, TrialOutcome, TrialRunner,
};
pub use space::{overrides, Config, Domain, Param, Space, SpaceError};

/// The shipped searchers, by name.
pub const BUILT_IN: [(&str, &str); 8] = [
    ("random", include_str!("../../scripts/hpo/random.rhai")),
    ("grid", include_str!("../../scripts/hpo/grid.rhai")),
    ("sha", include_str!("../../scripts/hpo/sha.rhai")),
    (
        "hyperband",
        include_str!("../../scripts/hpo/hyperband.rhai"),
    ),
    ("bo", include_str!("../../scripts/hpo/bo.rhai")),
    ("fts", include_str!("../../scripts/hpo/fts.rhai")),
    ("flora", include_str!("../../scripts/hpo/flora.rhai")),
    ("reseed", include_str!("../../scripts/hpo/reseed.rhai")),
];

/// Ranks starting at 1, ties sharing their average rank.
pub fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation of paired values (Pearson's on the ranks,
/// ties averaged); `None` with fewer than 3 pairs or when one side is constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 3 {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[3.0, 1.0, 2.0, 1.0]), [4.0, 1.5, 3.0, 1.5]);
    }

    #[test]
    fn spearman_matches_the_textbook_formula() {
        // Without ties, rho = 1 - 6 Σd² / (n (n² - 1)).
        let a = [1.0, 2.5, 0.3, 4.0, 3.3, -1.0];
        let b = [10.0, 8.0, 7.0, 1.0, 9.0, 2.0];
        let (ra, rb) = (ranks(&a), ranks(&b));
        let d2: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - y).powi(2)).sum();
        let n = a.len() as f64;
        let rho = 1.0 - 6.0 * d2 / (n * (n * n - 1.0));
        assert!((spearman(&a, &b).unwrap() - rho).abs() < 1e-12);
        assert_eq!(spearman(&a, &a), Some(1.0));
        let neg: Vec<f64> = a.iter().map(|x| -x).collect();
        assert_eq!(spearman(&a, &neg), Some(-1.0));
        assert_eq!(spearman(&a, &[1.0; 6]), None);
        assert_eq!(spearman(&a[..2], &b[..2]), None);
    }
}
