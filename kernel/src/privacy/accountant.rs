//! The Rényi-DP accountant of the (Poisson-)subsampled Gaussian mechanism
//! (Mironov, Talwar and Zhang 2019), as TensorFlow Privacy and Google's
//! `dp_accounting` compute it: the RDP of one round at each order α, times
//! the rounds, converted to (ε, δ) by the improved bound of Balle et al.
//! (2020), minimised over the orders.
//!
//! fedtune samples a fixed number of clients per round without
//! replacement; like TensorFlow Federated's DP-FedAvg it accounts for them
//! as Poisson sampling at rate q = clients per round / clients. With every
//! client in every round (q = 1, fedtune's default) the two are the same
//! and the bound is exact.

use crate::hpo::gp::ln_erfc_nonnegative;

/// The orders α tried: 1.1 … 10.9 by 0.1, 12 … 63, 128, 256 (`dp_accounting`'s).
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .chain([128.0, 256.0])
        .collect()
}

/// `ln(eˣ + eʸ)`.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms; ~1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 − x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).abs().ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// `ln C(n, k)` for real `n ≥ k ≥ 0`.
fn ln_binomial(n: f64, k: f64) -> f64 {
    ln_gamma(n + 1.0) - ln_gamma(k + 1.0) - ln_gamma(n - k + 1.0)
}

/// `ln erfc(x)`, accurate far into the tail.
fn ln_erfc(x: f64) -> f64 {
    if x >= 0.0 {
        ln_erfc_nonnegative(x)
    } else {
        (2.0 - ln_erfc_nonnegative(-x).exp()).ln()
    }
}

/// `ln A_α` for integer α (0 < q < 1).
fn ln_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let i = f64::from(i);
        let a = f64::from(alpha);
        let coef = ln_binomial(a, i) + i * ln_q + (a - i) * ln_1mq;
        log_add(acc, coef + (i * i - i) / (2.0 * sigma * sigma))
    })
}

/// `ln A_α` for fractional α (0 < q < 1), the two-sided series of Mironov
/// et al. §3.3; `∞` when it does not converge in 1000 terms (the order is
/// then not used, as `dp_accounting` does).
fn ln_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let root2_sigma = std::f64::consts::SQRT_2 * sigma;
    for i in 0..1000 {
        let i = f64::from(i);
        let coef = ln_binomial(alpha, i);
        let j = alpha - i;
        let t0 = coef + i * ln_q + j * ln_1mq;
        let t1 = coef + j * ln_q + i * ln_1mq;
        let e0 = 0.5f64.ln() + ln_erfc((i - z0) / root2_sigma);
        let e1 = 0.5f64.ln() + ln_erfc((z0 - j) / root2_sigma);
        let s0 = t0 + (i * i - i) / (2.0 * sigma * sigma) + e0;
        let s1 = t1 + (j * j - j) / (2.0 * sigma * sigma) + e1;
        a0 = log_add(a0, s0);
        a1 = log_add(a1, s1);
        let total = log_add(a0, a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        (last0, last1) = (s0, s1);
    }
    f64::INFINITY
}

/// The RDP at order `alpha` of one round: the Gaussian mechanism with
/// noise multiplier `sigma` on a sample taken at rate `q`.
pub fn rdp_one_round(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let ln_a = if alpha.fract() == 0.0 && alpha <= f64::from(u32::MAX) {
        ln_a_int(q, sigma, alpha as u32)
    } else {
        ln_a_frac(q, sigma, alpha)
    };
    ln_a / (alpha - 1.0)
}

/// The smallest ε with (ε, δ)-DP given the RDP `rdp[i]` at `orders[i]`,
/// and the order that gives it.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, 0.0);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// ε after `rounds` rounds of the sampled Gaussian mechanism (rate `q`,
/// noise multiplier `sigma`) at `delta`.
pub fn epsilon(q: f64, sigma: f64, rounds: u64, delta: f64) -> f64 {
    if rounds == 0 {
        return 0.0;
    }
    let orders = default_orders();
    let rdp: Vec<f64> = orders
        .iter()
        .map(|&a| rdp_one_round(q, sigma, a) * rounds as f64)
        .collect();
    epsilon_from_rdp(&orders, &rdp, delta).0
}

/// The smallest noise multiplier (to 0.1 %) that keeps ε within `target`
/// after `rounds` rounds at rate `q`; `None` past σ = 1000.
pub fn noise_for_epsilon(q: f64, rounds: u64, delta: f64, target: f64) -> Option<f64> {
    let fits = |sigma: f64| epsilon(q, sigma, rounds, delta) <= target;
    let mut hi = 1.0;
    while !fits(hi) {
        hi *= 2.0;
        if hi > 1000.0 {
            return None;
        }
    }
    let mut lo = 0.0;
    while hi - lo > 1e-3 * hi {
        let mid = 0.5 * (lo + hi);
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    /// Reference values from Google's `dp_accounting` 0.6.0 (the RDP
    /// accountant TensorFlow Privacy uses): `RdpAccountant(orders)` with
    /// the orders above, `compose(PoissonSampledDpEvent(q,
    /// GaussianDpEvent(sigma)), steps)`, `get_epsilon(delta)`; and
    /// `_compute_rdp_poisson_subsampled_gaussian(q, sigma, [2.5, 8, 32])`
    /// times the steps.
    const REFERENCE: [(f64, f64, u64, f64, f64, [f64; 3]); 7] = [
        (1.0, 1.0, 10, 1e-5, 19.05359753163139, [12.5, 40.0, 160.0]),
        (
            0.1,
            1.0,
            100,
            1e-5,
            7.903850223578231,
            [2.385328594777003, 137.8361411348127, 1362.3137968522594],
        ),
        (
            0.01,
            1.1,
            1000,
            1e-5,
            1.7117701662429012,
            [0.16215219755506363, 0.5840703355202598, 8469.416433675926],
        ),
        (
            0.3,
            0.8,
            50,
            1e-6,
            27.039034071840916,
            [24.108064686079445, 243.7039258055635, 1187.8594681638224],
        ),
        (1.0, 4.0, 3, 1e-5, 1.8472795614140454, [0.234375, 0.75, 3.0]),
        (
            0.05,
            2.0,
            500,
            1e-5,
            2.7685845622392886,
            [0.447672864603932, 1.5607633211504746, 458.1848047807873],
        ),
        (
            0.375,
            1.3,
            20,
            1e-5,
            8.61805432247575,
            [2.983815195820734, 25.567443269613698, 169.0997346711497],
        ),
    ];

    #[test]
    fn epsilon_and_rdp_match_dp_accounting() {
        for (q, sigma, steps, delta, eps, rdp) in REFERENCE {
            let got = epsilon(q, sigma, steps, delta);
            assert!(
                close(got, eps, 1e-3),
                "q {q} σ {sigma} T {steps}: ε {got} vs {eps}"
            );
            for (alpha, want) in [2.5, 8.0, 32.0].into_iter().zip(rdp) {
                let got = rdp_one_round(q, sigma, alpha) * steps as f64;
                assert!(
                    close(got, want, 1e-3),
                    "q {q} σ {sigma} α {alpha}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_helpers_match_closed_forms() {
        // Γ(5) = 24, Γ(0.5) = √π, C(10, 3) = 120.
        assert!(close(ln_gamma(5.0), 24f64.ln(), 1e-12));
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-12
        ));
        assert!(close(ln_binomial(10.0, 3.0), 120f64.ln(), 1e-12));
        // erfc(3) = 2.209049699858544e-05; far in the tail, the asymptote.
        assert!(close(ln_erfc(3.0), 2.209_049_699_858_544e-5f64.ln(), 1e-6));
        let x: f64 = 40.0;
        let asymptote = -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() - 0.5 / (x * x);
        assert!(close(ln_erfc(x), asymptote, 1e-6));
        assert!(close(ln_erfc(-1.0), 1.842_700_792_949_715f64.ln(), 1e-6));
    }

    #[test]
    fn more_noise_or_fewer_rounds_spend_less() {
        assert!(epsilon(1.0, 2.0, 10, 1e-5) < epsilon(1.0, 1.0, 10, 1e-5));
        assert!(epsilon(1.0, 1.0, 5, 1e-5) < epsilon(1.0, 1.0, 10, 1e-5));
        assert!(epsilon(0.1, 1.0, 10, 1e-5) < epsilon(1.0, 1.0, 10, 1e-5));
        assert_eq!(epsilon(1.0, 1.0, 0, 1e-5), 0.0);
        let sigma = noise_for_epsilon(1.0, 10, 1e-5, 8.0).unwrap();
        assert!(epsilon(1.0, sigma, 10, 1e-5) <= 8.0);
        assert!(epsilon(1.0, sigma * 0.99, 10, 1e-5) > 8.0);
    }
}
