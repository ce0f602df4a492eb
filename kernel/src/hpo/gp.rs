//! A Gaussian process over the unit cube, for Bayesian optimization.
//!
//! Searchers model the objective as a function of a configuration's
//! position in the unit cube ([`super::space::Space::to_unit`]). [`Gp`] is
//! exact GP regression with a Matérn-5/2 kernel on standardized targets; its
//! length scale and noise are chosen by the log marginal likelihood over a
//! small grid (the usual choice with tens of observations, and
//! deterministic). It predicts a mean and standard deviation, draws joint
//! posterior samples (Thompson sampling), and [`expected_improvement`] scores
//! a candidate for minimization.

use rand::Rng;
use thiserror::Error;

/// Why a GP cannot be fitted.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum GpError {
    /// No observations, or inputs of different lengths.
    #[error("{0}")]
    Shape(String),
    /// A target is NaN or infinite.
    #[error("observation {0} is not finite: fit only finished trials' objectives")]
    NotFinite(usize),
    /// The kernel matrix is not positive definite even with the largest noise.
    #[error("the kernel matrix is singular (duplicate points with different values?)")]
    Singular,
}

/// Matérn-5/2 kernel hyperparameters (signal variance 1 on standardized targets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kernel {
    /// Length scale in unit-cube distance.
    pub length: f64,
    /// Observation noise variance (standardized units).
    pub noise: f64,
}

impl Kernel {
    /// Covariance of two points.
    pub fn k(&self, a: &[f64], b: &[f64]) -> f64 {
        let r = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt()
            / self.length;
        let s = 5f64.sqrt() * r;
        (1.0 + s + s * s / 3.0) * (-s).exp()
    }
}

/// A fitted Gaussian process.
#[derive(Debug, Clone)]
pub struct Gp {
    xs: Vec<Vec<f64>>,
    kernel: Kernel,
    /// Lower Cholesky factor of K + noise·I.
    chol: Vec<Vec<f64>>,
    /// (K + noise·I)⁻¹ y, standardized.
    alpha: Vec<f64>,
    mean: f64,
    scale: f64,
    lml: f64,
}

const LENGTHS: [f64; 8] = [0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0];
const NOISES: [f64; 5] = [1e-6, 1e-4, 1e-3, 1e-2, 1e-1];

impl Gp {
    /// Fits `ys` at `xs`, choosing the kernel by log marginal likelihood.
    pub fn fit(xs: &[Vec<f64>], ys: &[f64]) -> Result<Self, GpError> {
        let mut best: Option<Gp> = None;
        for &length in &LENGTHS {
            for &noise in &NOISES {
                if let Ok(gp) = Self::with_kernel(xs, ys, Kernel { length, noise }) {
                    if best.as_ref().is_none_or(|b| gp.lml > b.lml) {
                        best = Some(gp);
                    }
                }
            }
        }
        match best {
            Some(gp) => Ok(gp),
            None => Self::with_kernel(
                xs,
                ys,
                Kernel {
                    length: 0.3,
                    noise: 0.1,
                },
            ),
        }
    }

    /// Fits with a given kernel.
    pub fn with_kernel(xs: &[Vec<f64>], ys: &[f64], kernel: Kernel) -> Result<Self, GpError> {
        let n = xs.len();
        if n == 0 || n != ys.len() {
            return Err(GpError::Shape(format!(
                "a GP needs as many values as points, at least one ({} points, {} values)",
                n,
                ys.len()
            )));
        }
        let d = xs[0].len();
        if let Some(i) = xs.iter().position(|x| x.len() != d) {
            return Err(GpError::Shape(format!(
                "point {i} has {} coordinates, point 0 has {d}",
                xs[i].len()
            )));
        }
        if let Some(i) = ys.iter().position(|y| !y.is_finite()) {
            return Err(GpError::NotFinite(i));
        }
        let mean = ys.iter().sum::<f64>() / n as f64;
        let var = ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / n as f64;
        let scale = if var > 1e-24 { var.sqrt() } else { 1.0 };
        let z: Vec<f64> = ys.iter().map(|y| (y - mean) / scale).collect();
        let mut k: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| kernel.k(&xs[i], &xs[j])).collect())
            .collect();
        for (i, row) in k.iter_mut().enumerate() {
            row[i] += kernel.noise;
        }
        let chol = cholesky(&k).ok_or(GpError::Singular)?;
        let alpha = back_solve(&chol, &forward_solve(&chol, &z));
        let lml = -0.5 * z.iter().zip(&alpha).map(|(a, b)| a * b).sum::<f64>()
            - chol.iter().enumerate().map(|(i, r)| r[i].ln()).sum::<f64>()
            - 0.5 * n as f64 * (2.0 * std::f64::consts::PI).ln();
        Ok(Self {
            xs: xs.to_vec(),
            kernel,
            chol,
            alpha,
            mean,
            scale,
            lml,
        })
    }

    /// The kernel in use.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Log marginal likelihood of the standardized targets.
    pub fn log_marginal_likelihood(&self) -> f64 {
        self.lml
    }

    /// Posterior mean and standard deviation of the latent function at `x`.
    pub fn predict(&self, x: &[f64]) -> (f64, f64) {
        let ks: Vec<f64> = self.xs.iter().map(|p| self.kernel.k(p, x)).collect();
        let mu = ks.iter().zip(&self.alpha).map(|(a, b)| a * b).sum::<f64>();
        let v = forward_solve(&self.chol, &ks);
        let var = (1.0 - v.iter().map(|a| a * a).sum::<f64>()).max(0.0);
        (self.mean + mu * self.scale, var.sqrt() * self.scale)
    }

    /// One joint draw of the latent function at `points` from the posterior.
    pub fn sample(&self, points: &[Vec<f64>], rng: &mut impl Rng) -> Result<Vec<f64>, GpError> {
        let d = self.xs[0].len();
        if let Some(i) = points
            .iter()
            .position(|p| p.len() != d || p.iter().any(|x| !x.is_finite()))
        {
            return Err(GpError::Shape(format!(
                "point {i} is not {d} finite coordinates"
            )));
        }
        let m = points.len();
        let kx: Vec<Vec<f64>> = points
            .iter()
            .map(|p| self.xs.iter().map(|x| self.kernel.k(x, p)).collect())
            .collect();
        let vs: Vec<Vec<f64>> = kx.iter().map(|k| forward_solve(&self.chol, k)).collect();
        let means: Vec<f64> = kx
            .iter()
            .map(|k| k.iter().zip(&self.alpha).map(|(a, b)| a * b).sum::<f64>())
            .collect();
        let mut cov: Vec<Vec<f64>> = (0..m)
            .map(|i| {
                (0..m)
                    .map(|j| {
                        self.kernel.k(&points[i], &points[j])
                            - vs[i].iter().zip(&vs[j]).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect()
            })
            .collect();
        // Near-duplicate points make the posterior covariance singular:
        // add jitter until it factors (a variance of 1e-3 at most).
        let mut jitter = 1e-9;
        let l = loop {
            if let Some(l) = cholesky(&cov) {
                break l;
            }
            if jitter > 1e-3 {
                return Err(GpError::Singular);
            }
            for (i, row) in cov.iter_mut().enumerate() {
                row[i] += jitter;
            }
            jitter *= 10.0;
        };
        let z: Vec<f64> = (0..m).map(|_| standard_normal(rng)).collect();
        Ok((0..m)
            .map(|i| {
                let dev: f64 = (0..=i).map(|j| l[i][j] * z[j]).sum();
                self.mean + (means[i] + dev) * self.scale
            })
            .collect())
    }
}

/// Expected improvement below `best` of a normal prediction (`mean`, `std`),
/// for minimization: E[max(best − Y, 0)], Y ~ N(mean, std²).
pub fn expected_improvement(mean: f64, std: f64, best: f64) -> f64 {
    let gain = best - mean;
    if std <= 1e-300 {
        return gain.max(0.0);
    }
    let z = gain / std;
    gain * normal_cdf(z) + std * normal_pdf(z)
}

/// The standard normal density.
pub fn normal_pdf(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// The standard normal distribution function.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' Chebyshev fit,
/// relative error below 1.2e-7 everywhere).
pub(crate) fn erfc(x: f64) -> f64 {
    let r = ln_erfc_nonnegative(x.abs()).exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// `ln erfc(z)` for `z ≥ 0`, without underflow however large `z` is (the
/// same fit, taken in log space).
pub(crate) fn ln_erfc_nonnegative(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t.ln() + poly
}

/// A standard normal draw (Box–Muller).
pub(crate) fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The lower Cholesky factor of a symmetric positive definite matrix.
fn cholesky(a: &[Vec<f64>]) -> Option<Vec<Vec<f64>>> {
    let n = a.len();
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = a[i][i] - s;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i][i] = d.sqrt();
            } else {
                l[i][j] = (a[i][j] - s) / l[j][j];
            }
        }
    }
    Some(l)
}

/// Solves L x = b.
fn forward_solve(l: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let mut x = vec![0.0; b.len()];
    for i in 0..b.len() {
        let s: f64 = (0..i).map(|k| l[i][k] * x[k]).sum();
        x[i] = (b[i] - s) / l[i][i];
    }
    x
}

/// Solves Lᵀ x = b.
fn back_solve(l: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k][i] * x[k]).sum();
        x[i] = (b[i] - s) / l[i][i];
    }
    x
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn the_normal_functions_match_tables() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.959_963_985) - 0.975).abs() < 1e-6);
        assert!((normal_cdf(-1.0) - 0.158_655_254).abs() < 1e-6);
        assert!((normal_pdf(0.0) - 0.398_942_280).abs() < 1e-9);
    }

    #[test]
    fn expected_improvement_matches_its_integral() {
        // E[max(best − Y, 0)] by the trapezoid rule over ±12 σ.
        for &(mean, std, best) in &[
            (0.0, 1.0, 0.0),
            (1.0, 0.5, 0.3),
            (-0.4, 2.0, 0.7),
            (2.0, 0.1, 2.5),
        ] {
            let n = 200_000;
            let (lo, hi) = (mean - 12.0 * std, mean + 12.0 * std);
            let h = (hi - lo) / n as f64;
            let integral: f64 = (0..=n)
                .map(|i| {
                    let y = lo + i as f64 * h;
                    let w = if i == 0 || i == n { 0.5 } else { 1.0 };
                    w * (best - y).max(0.0) * normal_pdf((y - mean) / std) / std
                })
                .sum::<f64>()
                * h;
            let ei = expected_improvement(mean, std, best);
            assert!(
                (ei - integral).abs() < 1e-6,
                "{mean} {std} {best}: {ei} vs {integral}"
            );
        }
        assert!((expected_improvement(0.0, 1.0, 0.0) - 0.398_942_28).abs() < 1e-7);
        assert_eq!(expected_improvement(1.0, 0.0, 3.0), 2.0);
        assert_eq!(expected_improvement(4.0, 0.0, 3.0), 0.0);
    }

    #[test]
    fn two_points_give_the_closed_form_posterior() {
        let kernel = Kernel {
            length: 0.5,
            noise: 1e-2,
        };
        let xs = vec![vec![0.2], vec![0.6]];
        let ys = vec![1.0, 3.0];
        let gp = Gp::with_kernel(&xs, &ys, kernel).unwrap();
        // Standardized targets are ∓1 (mean 2, scale 1); invert the 2×2 by hand.
        let k12 = kernel.k(&xs[0], &xs[1]);
        let (a, b) = (1.0 + kernel.noise, k12);
        let det = a * a - b * b;
        let inv = [[a / det, -b / det], [-b / det, a / det]];
        let z = [-1.0, 1.0];
        let x = [0.45];
        let ks = [kernel.k(&xs[0], &x), kernel.k(&xs[1], &x)];
        let alpha = [
            inv[0][0] * z[0] + inv[0][1] * z[1],
            inv[1][0] * z[0] + inv[1][1] * z[1],
        ];
        let mean = 2.0 + ks[0] * alpha[0] + ks[1] * alpha[1];
        let quad = ks[0] * (inv[0][0] * ks[0] + inv[0][1] * ks[1])
            + ks[1] * (inv[1][0] * ks[0] + inv[1][1] * ks[1]);
        let std = (1.0 - quad).sqrt();
        let (m, s) = gp.predict(&x);
        assert!(
            (m - mean).abs() < 1e-12 && (s - std).abs() < 1e-12,
            "{m} {s} vs {mean} {std}"
        );
        // The log marginal likelihood, by hand.
        let lml = -0.5 * (z[0] * alpha[0] + z[1] * alpha[1])
            - 0.5 * det.ln()
            - (2.0 * std::f64::consts::PI).ln();
        assert!((gp.log_marginal_likelihood() - lml).abs() < 1e-12);
    }

    #[test]
    fn a_fitted_gp_interpolates_a_smooth_function() {
        let f = |x: &[f64]| (3.0 * x[0]).sin() + (x[1] - 0.5).powi(2);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let xs: Vec<Vec<f64>> = (0..30).map(|_| vec![rng.random(), rng.random()]).collect();
        let ys: Vec<f64> = xs.iter().map(|x| f(x)).collect();
        let gp = Gp::fit(&xs, &ys).unwrap();
        for x in &xs {
            let (m, _) = gp.predict(x);
            assert!((m - f(x)).abs() < 0.01, "at a training point");
        }
        let test = [0.37, 0.71];
        let (m, s) = gp.predict(&test);
        assert!(
            (m - f(&test)).abs() < 0.1 && s < 0.2,
            "{m} vs {} (std {s})",
            f(&test)
        );
    }

    #[test]
    fn posterior_samples_have_the_posterior_moments() {
        let xs = vec![vec![0.1], vec![0.5], vec![0.9]];
        let gp = Gp::with_kernel(
            &xs,
            &[0.0, 1.0, 0.5],
            Kernel {
                length: 0.3,
                noise: 1e-3,
            },
        )
        .unwrap();
        let points = vec![vec![0.3], vec![0.7]];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 20_000;
        let mut sum = [0.0; 2];
        let mut sq = [0.0; 2];
        for _ in 0..n {
            let s = gp.sample(&points, &mut rng).unwrap();
            for i in 0..2 {
                sum[i] += s[i];
                sq[i] += s[i] * s[i];
            }
        }
        for i in 0..2 {
            let (m, sd) = gp.predict(&points[i]);
            let mean = sum[i] / n as f64;
            let var = sq[i] / n as f64 - mean * mean;
            assert!((mean - m).abs() < 0.02, "{mean} vs {m}");
            assert!((var.sqrt() - sd).abs() < 0.02, "{} vs {sd}", var.sqrt());
        }
    }

    #[test]
    fn bad_observations_are_refused() {
        assert!(matches!(Gp::fit(&[], &[]), Err(GpError::Shape(_))));
        assert!(matches!(
            Gp::fit(&[vec![0.1], vec![0.2]], &[1.0, f64::INFINITY]),
            Err(GpError::NotFinite(1))
        ));
        assert!(matches!(
            Gp::fit(&[vec![0.1], vec![0.2, 0.3]], &[1.0, 2.0]),
            Err(GpError::Shape(_))
        ));
    }
}
