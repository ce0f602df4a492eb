//! Differential privacy for federated courses: DP-FedAvg (McMahan et al.
//! 2018) with client-level clipping of each update's L2 norm and Gaussian
//! noise, added by the server to the clipped mean (`dp = "central"`) or by
//! each client to its own clipped update before it leaves (`dp = "local"`);
//! adaptive clipping by the quantile method of Andrew et al. (2021); and an
//! RDP accountant ([`accountant`]) that reports (ε, δ) after every round and
//! refuses a course whose planned rounds would spend more than
//! `target_epsilon`.
//!
//! Central DP wraps the configured strategy ([`DpStrategy`]): the clients'
//! updates are clipped, averaged with equal weights and noised, and the
//! strategy receives that one noised mean as its only update. Everything it
//! does with it (server momentum, FedAdam) is post-processing, so the
//! guarantee holds for any strategy; strategies that need the individual
//! updates (median, Krum, SCAFFOLD's corrections, FedNova's step counts)
//! lose their meaning and are refused by name.
//!
//! Clipping and noise are also plain functions ([`clip_update`],
//! [`add_gaussian_noise`]) that strategy scripts call to build variants.
//!
//! Secure aggregation (`secure_aggregation = true`: the server learns only
//! the sum of the updates) is [`secagg`]'s arithmetic and cryptography,
//! run as a protocol by [`crate::course::secagg`].

pub mod accountant;
pub mod secagg;

use std::collections::BTreeMap;

use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::aggregate::{
    fill_from, AggregateError, Aggregator, ClientEval, ClientUpdate, FitError, FitInstruction,
};
use crate::config::KeyError;
use crate::course::derive_seed;
use crate::hpo::gp::standard_normal;
use crate::params::{ParamError, ParamSet};

/// Where the noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpMode {
    /// No differential privacy.
    #[default]
    None,
    /// The server clips each update and noises the mean (trusts the server).
    Central,
    /// Each client clips and noises its own update before sending it.
    Local,
}

/// `[privacy]`: differential privacy of the clients' updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacySection {
    /// "none", "central" or "local".
    pub dp: DpMode,
    /// The L2 norm each update (its difference from what the client was
    /// sent) is clipped to: the sensitivity. The starting value when adaptive.
    pub clip_norm: f64,
    /// The noise's standard deviation in units of `clip_norm` (σ / C).
    pub noise_multiplier: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Refuse a course whose planned rounds would spend more than this ε.
    pub target_epsilon: Option<f64>,
    /// Central DP: adapt `clip_norm` toward the `target_quantile` of the
    /// updates' norms each round (Andrew et al.).
    pub adaptive_clip: bool,
    /// The fraction of updates that should fall under the clip norm.
    pub target_quantile: f64,
    /// The geometric step of the clip norm's update.
    pub clip_learning_rate: f64,
    /// Standard deviation of the noise on the count of unclipped updates
    /// (default: clients per round / 20, the paper's choice). Part of the
    /// privacy budget: the updates' own noise is raised to keep the total σ.
    pub count_noise: Option<f64>,
    /// Local DP: draw each client's noise from a seed the course config
    /// determines (course seed, client, round), so a simulation repeats —
    /// but then whoever knows the config, the server included, can redraw
    /// the noise and remove it. Off (the default), each client draws its
    /// noise from the operating system's random source.
    pub reproducible_local_noise: bool,
    /// Secure aggregation: the clients mask their updates so that the
    /// server learns only their sum (see [`secagg`]).
    pub secure_aggregation: bool,
    /// The fraction of a round's clients whose shares recover a dropped
    /// client's masks: the threshold is `⌊fraction × n⌋ + 1` (at least 2).
    pub secagg_threshold: f64,
}

impl Default for PrivacySection {
    fn default() -> Self {
        Self {
            dp: DpMode::None,
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            target_epsilon: None,
            adaptive_clip: false,
            target_quantile: 0.5,
            clip_learning_rate: 0.2,
            count_noise: None,
            reproducible_local_noise: false,
            secure_aggregation: false,
            secagg_threshold: 0.5,
        }
    }
}

impl DpMode {
    /// The mode as `[privacy] dp` spells it.
    pub fn name(self) -> &'static str {
        match self {
            DpMode::None => "none",
            DpMode::Central => "central",
            DpMode::Local => "local",
        }
    }
}

/// Shipped strategies that central DP or secure aggregation would break:
/// their result is not a function of the mean update, or they send clients
/// parameters of their own.
const NEEDS_EACH_UPDATE: [&str; 8] = [
    "median",
    "trimmed_mean",
    "krum",
    "bulyan",
    "scaffold",
    "fednova",
    "flexlora",
    "hetlora",
];

/// Refuses `strategy` when it is one of [`NEEDS_EACH_UPDATE`]: `hides` says
/// what the server sees instead of each client's update, `or_else` what
/// else a user may change.
fn each_update_needed(strategy: Option<&str>, hides: &str, or_else: &str) -> Result<(), KeyError> {
    match strategy {
        Some(name) if NEEDS_EACH_UPDATE.contains(&crate::script::shipped_name(name)) => {
            Err(KeyError::new(
                "aggregator.script",
                format!("`{name}` needs each client's own update or sends clients parameters of their own, but {hides} (use fedavg, fedavgm, fedadam, fedyogi or fedadagrad{or_else})"),
            ))
        }
        _ => Ok(()),
    }
}

impl PrivacySection {
    /// Whether any DP is on.
    pub fn enabled(&self) -> bool {
        self.dp != DpMode::None
    }

    /// The rate at which a client takes part in a round, as accounted.
    /// Local DP: every client release counts (the server sees who sent).
    pub fn sample_rate(&self, clients: u32, per_round: u32) -> f64 {
        match self.dp {
            DpMode::Central => f64::from(per_round) / f64::from(clients.max(1)),
            _ => 1.0,
        }
    }

    /// The standard deviation of the count noise (adaptive clipping).
    fn count_std(&self, per_round: u32) -> f64 {
        self.count_noise.unwrap_or(f64::from(per_round) / 20.0)
    }

    /// The noise multiplier left for the updates once adaptive clipping's
    /// count took its share: `(σ⁻² − (2σ_b)⁻²)^(−1/2)` (Andrew et al., Thm. 1).
    pub fn update_noise_multiplier(&self, per_round: u32) -> Result<f64, KeyError> {
        if !(self.adaptive_clip && self.dp == DpMode::Central) || self.noise_multiplier == 0.0 {
            return Ok(self.noise_multiplier);
        }
        let z = self.noise_multiplier;
        let b = self.count_std(per_round);
        let rest = z.powi(-2) - (2.0 * b).powi(-2);
        if rest <= 0.0 {
            return Err(KeyError::new(
                "privacy.count_noise",
                format!(
                    "{b}{} is too small for noise_multiplier {z}: adaptive clipping needs 2 × count_noise > noise_multiplier",
                    if self.count_noise.is_none() { " (the default, clients per round / 20)" } else { "" }
                ),
            ));
        }
        Ok(rest.powf(-0.5))
    }

    /// ε after `rounds` rounds.
    pub fn epsilon_after(&self, rounds: u64, clients: u32, per_round: u32) -> f64 {
        accountant::epsilon(
            self.sample_rate(clients, per_round),
            self.noise_multiplier,
            rounds,
            self.delta,
        )
    }

    /// Checks the values, the strategy, and that `rounds` fit the budget.
    pub fn validate(
        &self,
        rounds: u64,
        clients: u32,
        per_round: u32,
        strategy: Option<&str>,
    ) -> Result<(), KeyError> {
        self.validate_secagg(per_round, strategy)?;
        if !self.enabled() {
            return Ok(());
        }
        let positive = |key: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(KeyError::new(
                    key,
                    format!("must be a positive number, got {v}"),
                ))
            }
        };
        positive("privacy.clip_norm", self.clip_norm)?;
        if !(self.noise_multiplier >= 0.0 && self.noise_multiplier.is_finite()) {
            return Err(KeyError::new(
                "privacy.noise_multiplier",
                format!("must be 0 or more, got {}", self.noise_multiplier),
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(KeyError::new(
                "privacy.delta",
                format!("must be between 0 and 1, got {}", self.delta),
            ));
        }
        if self.adaptive_clip {
            if self.dp != DpMode::Central {
                return Err(KeyError::new(
                    "privacy.adaptive_clip",
                    "adaptive clipping needs dp = \"central\" (the server sets the clip norm)",
                ));
            }
            if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
                return Err(KeyError::new(
                    "privacy.target_quantile",
                    format!("must be between 0 and 1, got {}", self.target_quantile),
                ));
            }
            positive("privacy.clip_learning_rate", self.clip_learning_rate)?;
            positive("privacy.count_noise", self.count_std(per_round))?;
            self.update_noise_multiplier(per_round)?;
        }
        if self.dp == DpMode::Central {
            each_update_needed(
                strategy,
                "with privacy.dp = \"central\" the strategy sees only the clipped, noised mean of the updates",
                ", or dp = \"local\"",
            )?;
        }
        if let Some(target) = self.target_epsilon {
            positive("privacy.target_epsilon", target)?;
            let eps = self.epsilon_after(rounds, clients, per_round);
            if eps > target {
                let q = self.sample_rate(clients, per_round);
                let need = accountant::noise_for_epsilon(q, rounds, self.delta, target)
                    .map(|s| {
                        format!(
                            "raise privacy.noise_multiplier to {s:.3} or more, or run fewer rounds"
                        )
                    })
                    .unwrap_or_else(|| "run fewer rounds".into());
                return Err(KeyError::new(
                    "privacy.target_epsilon",
                    format!(
                        "{rounds} rounds would spend ε = {eps:.3} > {target} (sampling rate {q:.3}, noise multiplier {}, δ {}): {need}",
                        self.noise_multiplier, self.delta
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl PrivacySection {
    /// Checks secure aggregation's settings against the course.
    fn validate_secagg(&self, per_round: u32, strategy: Option<&str>) -> Result<(), KeyError> {
        if !self.secure_aggregation {
            return Ok(());
        }
        let key = "privacy.secure_aggregation";
        if self.dp == DpMode::Central {
            return Err(KeyError::new(
                key,
                "central DP clips each client's update at the server, which secure aggregation hides from it: use dp = \"local\" (each client clips and noises before masking)",
            ));
        }
        if per_round < 3 {
            return Err(KeyError::new(
                key,
                format!("needs at least 3 clients a round (this course samples {per_round}): with fewer, a client's update follows from the sum and its own"),
            ));
        }
        if !(self.secagg_threshold > 0.0 && self.secagg_threshold < 1.0) {
            return Err(KeyError::new(
                "privacy.secagg_threshold",
                format!("must be between 0 and 1, got {}", self.secagg_threshold),
            ));
        }
        each_update_needed(
            strategy,
            "with secure aggregation the server learns only the sample-weighted sum of the updates",
            "",
        )
    }
}

/// The seed of client `client`'s local-DP noise in `round`: from the
/// course's seed when `cfg` asks for reproducible noise, else from the
/// operating system's random source (which the server cannot redraw).
pub fn local_noise_seed(
    cfg: &PrivacySection,
    course_seed: u64,
    client: u32,
    round: u64,
) -> Result<u64, getrandom::Error> {
    if cfg.reproducible_local_noise {
        return Ok(noise_seed(course_seed, client, round));
    }
    let mut b = [0u8; 8];
    getrandom::fill(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A seed for round `round`'s noise of `client` (0: the server's), apart
/// from the training seeds.
pub fn noise_seed(course_seed: u64, client: u32, round: u64) -> u64 {
    derive_seed(course_seed ^ 0x6470_6e6f_6973_6521, client, round)
}

/// `reference` plus `update − reference` scaled to L2 norm at most `clip`,
/// and the norm before clipping. Tensors `update` leaves out count as
/// unchanged.
pub fn clip_update(
    update: &ParamSet,
    reference: &ParamSet,
    clip: f64,
) -> Result<(ParamSet, f64), ParamError> {
    let full = fill_from(update.clone(), reference);
    let mut delta = full.sub(reference)?;
    let norm = delta.l2_norm();
    if norm > clip {
        delta.scale_assign((clip / norm) as f32);
    }
    Ok((reference.add(&delta)?, norm))
}

/// Adds independent N(0, std²) noise to every value of `params`, drawn
/// from a ChaCha stream seeded by `seed` (tensors in name order).
pub fn add_gaussian_noise(params: &mut ParamSet, std: f64, seed: u64) {
    if std == 0.0 {
        return;
    }
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(seed);
    for (_, t) in params.iter_mut() {
        for v in t.data_mut() {
            *v += (std * standard_normal(&mut rng)) as f32;
        }
    }
}

/// Local DP: the client's `update` clipped against what it was `sent`,
/// with N(0, (σC)²) noise on every value it sends.
pub fn privatize_local(
    update: &ParamSet,
    sent: &ParamSet,
    cfg: &PrivacySection,
    seed: u64,
) -> Result<ParamSet, ParamError> {
    // Only the tensors the client sends are released.
    let mut sent_part = ParamSet::new();
    for (name, _) in update.iter() {
        if let Some(t) = sent.get(name) {
            sent_part.insert_tensor(name, t.clone());
        }
    }
    let (mut clipped, _) = clip_update(update, &sent_part, cfg.clip_norm)?;
    add_gaussian_noise(&mut clipped, cfg.noise_multiplier * cfg.clip_norm, seed);
    Ok(clipped)
}

/// What central DP keeps across rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CentralState {
    clip: f64,
    inner: Option<Vec<u8>>,
}

/// DP around a strategy: central DP as the module's documentation says;
/// with local DP (the clients noise) only the accounting, `dp_epsilon` being
/// each client's ε if it took part in every round so far.
pub struct DpStrategy {
    inner: Box<dyn Aggregator>,
    cfg: PrivacySection,
    name: String,
    course_seed: u64,
    clients: u32,
    per_round: u32,
    update_noise: f64,
    clip: f64,
    last: BTreeMap<String, f64>,
}

impl DpStrategy {
    /// Wraps `inner` (the configuration was validated).
    pub fn new(
        inner: Box<dyn Aggregator>,
        cfg: PrivacySection,
        course_seed: u64,
        clients: u32,
        per_round: u32,
    ) -> Self {
        let update_noise = cfg
            .update_noise_multiplier(per_round)
            .unwrap_or(cfg.noise_multiplier);
        Self {
            name: format!("dp-{}({})", cfg.dp.name(), inner.name()),
            clip: cfg.clip_norm,
            inner,
            cfg,
            course_seed,
            clients,
            per_round,
            update_noise,
            last: BTreeMap::new(),
        }
    }
}

/// The mean of the present values of `of` over the updates.
fn mean_of(updates: &[ClientUpdate], of: impl Fn(&ClientUpdate) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = updates.iter().filter_map(of).collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

impl Aggregator for DpStrategy {
    fn name(&self) -> &str {
        &self.name
    }

    fn aggregate(
        &mut self,
        global: &ParamSet,
        updates: &[ClientUpdate],
        round: u64,
    ) -> Result<ParamSet, AggregateError> {
        if self.cfg.dp != DpMode::Central {
            return self.inner.aggregate(global, updates, round);
        }
        if updates.is_empty() {
            return Err(AggregateError::Empty);
        }
        let m = updates.len() as f64;
        let mut sum = global.zeros_like();
        let mut unclipped = 0usize;
        let mut norms = Vec::with_capacity(updates.len());
        for u in updates {
            let (clipped, norm) = clip_update(&u.params, global, self.clip)?;
            sum.add_assign(&clipped.sub(global)?)?;
            unclipped += usize::from(norm <= self.clip);
            norms.push(norm);
        }
        sum.scale_assign((1.0 / m) as f32);
        let std = self.update_noise * self.clip / m;
        add_gaussian_noise(&mut sum, std, noise_seed(self.course_seed, 0, round));
        let noised = global.add(&sum)?;
        self.last = BTreeMap::from([
            ("dp_clip_norm".to_string(), self.clip),
            ("dp_noise_std".to_string(), std),
            ("dp_unclipped_fraction".to_string(), unclipped as f64 / m),
            (
                "dp_update_norm_mean".to_string(),
                norms.iter().sum::<f64>() / m,
            ),
        ]);
        if self.cfg.adaptive_clip {
            // The noised fraction of updates under the clip, and a
            // geometric step of the clip toward the target quantile.
            let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(noise_seed(
                self.course_seed,
                u32::MAX,
                round,
            ));
            let count =
                unclipped as f64 + self.cfg.count_std(self.per_round) * standard_normal(&mut rng);
            let fraction = count / m;
            self.clip *=
                (-self.cfg.clip_learning_rate * (fraction - self.cfg.target_quantile)).exp();
        }
        let single = ClientUpdate {
            client: 0,
            n_samples: updates.iter().map(|u| u.n_samples).sum(),
            params: noised,
            local_steps: mean_of(updates, |u| u.local_steps.map(|s| s as f64))
                .map(|s| s.round() as u64),
            train_loss: mean_of(updates, |u| u.train_loss),
            ..ClientUpdate::default()
        };
        self.inner.aggregate(global, &[single], round)
    }

    fn on_round_start(&mut self, round: u64) -> Result<(), AggregateError> {
        self.inner.on_round_start(round)
    }

    fn sample(
        &mut self,
        round: u64,
        joined: &[u32],
        default: Vec<u32>,
    ) -> Result<Vec<u32>, AggregateError> {
        self.inner.sample(round, joined, default)
    }

    fn configure_fit(
        &mut self,
        global: &ParamSet,
        clients: &[u32],
        round: u64,
    ) -> Result<Vec<FitInstruction>, AggregateError> {
        let plan = self.inner.configure_fit(global, clients, round)?;
        if self.cfg.dp == DpMode::Central && plan.iter().any(|i| i.params.is_some()) {
            return Err(AggregateError::Other(format!(
                "{} sends clients parameters of their own, but central DP clips every update against the global parameters",
                self.inner.name()
            )));
        }
        Ok(plan)
    }

    fn check_update(&self, sent: &ParamSet, update: &ParamSet) -> Result<(), FitError> {
        self.inner.check_update(sent, update)
    }

    fn on_round_end(
        &mut self,
        global: &ParamSet,
        round: u64,
    ) -> Result<BTreeMap<String, f64>, AggregateError> {
        let mut metrics = self.inner.on_round_end(global, round)?;
        metrics.append(&mut self.last.clone());
        // Without noise there is no finite ε to report (and records hold
        // finite numbers only).
        let eps = self.cfg.epsilon_after(round, self.clients, self.per_round);
        if eps.is_finite() {
            metrics.insert("dp_epsilon".into(), eps);
        }
        Ok(metrics)
    }

    fn aggregate_evaluate(
        &mut self,
        results: &[ClientEval],
        round: u64,
    ) -> Result<BTreeMap<String, f64>, AggregateError> {
        self.inner.aggregate_evaluate(results, round)
    }

    fn save_state(&self) -> Result<Option<Vec<u8>>, AggregateError> {
        let state = CentralState {
            clip: self.clip,
            inner: self.inner.save_state()?,
        };
        serde_json::to_vec(&state)
            .map(Some)
            .map_err(|e| AggregateError::Other(format!("saving the DP state: {e}")))
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), AggregateError> {
        let state: CentralState = serde_json::from_slice(bytes)
            .map_err(|e| AggregateError::Other(format!("restoring the DP state: {e}")))?;
        if !(state.clip > 0.0 && state.clip.is_finite()) {
            return Err(AggregateError::Other(format!(
                "restoring the DP state: clip norm {} is not a positive number",
                state.clip
            )));
        }
        self.clip = state.clip;
        match state.inner {
            Some(inner) => self.inner.load_state(&inner),
            None => Ok(()),
        }
    }
}

/// The server's strategy as the course's `[privacy]` says: `inner` itself,
/// or DP around it.
pub fn wrap(
    inner: Box<dyn Aggregator>,
    cfg: &PrivacySection,
    course_seed: u64,
    clients: u32,
    per_round: u32,
) -> Box<dyn Aggregator> {
    match cfg.dp {
        DpMode::None => inner,
        _ => Box::new(DpStrategy::new(
            inner,
            cfg.clone(),
            course_seed,
            clients,
            per_round,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FedAvg;

    fn vector(w: &[f32]) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("w", vec![w.len()], w.to_vec()).unwrap();
        p
    }

    fn w(p: &ParamSet) -> Vec<f32> {
        p.get("w").unwrap().data().to_vec()
    }

    fn central(noise: f64, clip: f64) -> PrivacySection {
        PrivacySection {
            dp: DpMode::Central,
            clip_norm: clip,
            noise_multiplier: noise,
            ..PrivacySection::default()
        }
    }

    #[test]
    fn clipping_scales_only_updates_over_the_norm() {
        let global = vector(&[1.0, 1.0]);
        // Δ = (3, 4), norm 5 → clipped to norm 1: (0.6, 0.8).
        let (clipped, norm) = clip_update(&vector(&[4.0, 5.0]), &global, 1.0).unwrap();
        assert_eq!(norm, 5.0);
        assert_eq!(w(&clipped), [1.6, 1.8]);
        let (kept, norm) = clip_update(&vector(&[1.3, 1.4]), &global, 1.0).unwrap();
        assert!((norm - 0.5).abs() < 1e-6);
        assert_eq!(w(&kept), [1.3, 1.4]);
        // A tensor the update leaves out is unchanged, not zeroed.
        let mut two = global.clone();
        two.insert("b", vec![1], vec![7.0]).unwrap();
        let (filled, _) = clip_update(&vector(&[4.0, 5.0]), &two, 1.0).unwrap();
        assert_eq!(filled.get("b").unwrap().data(), [7.0]);
    }

    #[test]
    fn the_noise_has_the_asked_spread_and_follows_its_seed() {
        let mut a = ParamSet::new();
        a.insert("x", vec![200_000], vec![0.0; 200_000]).unwrap();
        let mut b = a.clone();
        add_gaussian_noise(&mut a, 0.3, 7);
        add_gaussian_noise(&mut b, 0.3, 7);
        assert_eq!(a, b, "same seed, same noise");
        let v = a.get("x").unwrap().data();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        // Standard errors: 0.3/√n ≈ 7e-4 for the mean, ~0.3 % for the std.
        assert!(mean.abs() < 3e-3, "{mean}");
        assert!((var.sqrt() - 0.3).abs() < 0.3 * 0.01, "{}", var.sqrt());
        add_gaussian_noise(&mut b, 0.3, 8);
        assert_ne!(a, b);
    }

    #[test]
    fn central_dp_without_noise_is_the_clipped_equal_weight_mean() {
        // Δ₁ = (3, 4) clipped to (0.6, 0.8); Δ₂ = (0, 0.5) kept; equal
        // weights whatever n_samples says: mean (0.3, 0.65).
        let global = vector(&[1.0, 1.0]);
        let updates = [
            ClientUpdate::new(1, 900, vector(&[4.0, 5.0])),
            ClientUpdate::new(2, 100, vector(&[1.0, 1.5])),
        ];
        let mut dp = DpStrategy::new(Box::new(FedAvg), central(0.0, 1.0), 1, 2, 2);
        let out = dp.aggregate(&global, &updates, 1).unwrap();
        let got = w(&out);
        assert!(
            (got[0] - 1.3).abs() < 1e-6 && (got[1] - 1.65).abs() < 1e-6,
            "{got:?}"
        );
        let m = dp.on_round_end(&out, 1).unwrap();
        assert_eq!(m["dp_unclipped_fraction"], 0.5);
        assert_eq!(m["dp_update_norm_mean"], 2.75);
        assert!(!m.contains_key("dp_epsilon"), "no noise, no finite ε");
    }

    #[test]
    fn central_noise_is_sigma_c_over_m_and_epsilon_is_the_accountants() {
        let mut global = ParamSet::new();
        global.insert("w", vec![50_000], vec![0.5; 50_000]).unwrap();
        let updates: Vec<ClientUpdate> = (1..=4)
            .map(|c| ClientUpdate::new(c, 1, global.clone()))
            .collect();
        let mut dp = DpStrategy::new(Box::new(FedAvg), central(2.0, 0.5), 3, 8, 4);
        let out = dp.aggregate(&global, &updates, 3).unwrap();
        // Zero updates: what moved is the noise alone, σC/m = 0.25.
        let d = out.sub(&global).unwrap();
        let std = (d.l2_norm().powi(2) / d.num_elements() as f64).sqrt();
        assert!((std - 0.25).abs() < 0.25 * 0.02, "{std}");
        let m = dp.on_round_end(&out, 3).unwrap();
        assert_eq!(m["dp_noise_std"], 0.25);
        assert_eq!(m["dp_epsilon"], accountant::epsilon(0.5, 2.0, 3, 1e-5));
        // The same round again draws the same noise (a resumed course).
        let mut again = DpStrategy::new(Box::new(FedAvg), central(2.0, 0.5), 3, 8, 4);
        assert_eq!(again.aggregate(&global, &updates, 3).unwrap(), out);
    }

    #[test]
    fn adaptive_clipping_moves_toward_the_quantile_and_its_state_resumes() {
        let mut cfg = central(1.0, 1.0);
        cfg.adaptive_clip = true;
        cfg.count_noise = Some(1e-9);
        let global = vector(&[0.0, 0.0]);
        // Both updates (norm 0.1) are under the clip: fraction 1, so the
        // clip shrinks by exp(−0.2 · (1 − 0.5)).
        let updates = [
            ClientUpdate::new(1, 1, vector(&[0.1, 0.0])),
            ClientUpdate::new(2, 1, vector(&[0.0, 0.1])),
        ];
        let mut dp = DpStrategy::new(Box::new(FedAvg), cfg.clone(), 1, 2, 2);
        dp.aggregate(&global, &updates, 1).unwrap();
        assert!((dp.clip - (-0.1f64).exp()).abs() < 1e-6, "{}", dp.clip);
        let saved = dp.save_state().unwrap().unwrap();
        let mut resumed = DpStrategy::new(Box::new(FedAvg), cfg, 1, 2, 2);
        resumed.load_state(&saved).unwrap();
        assert_eq!(
            resumed.aggregate(&global, &updates, 2).unwrap(),
            dp.aggregate(&global, &updates, 2).unwrap()
        );
        assert!(resumed
            .load_state(br#"{"clip": -1, "inner": null}"#)
            .is_err());
    }

    #[test]
    fn the_budget_and_the_strategy_are_checked_before_a_course() {
        let mut cfg = central(1.0, 1.0);
        cfg.target_epsilon = Some(8.0);
        // q = 1, σ = 1: 10 rounds spend ε ≈ 19.05.
        let err = cfg.validate(10, 3, 3, None).unwrap_err();
        assert_eq!(err.key, "privacy.target_epsilon");
        assert!(err.message.contains("ε = 19.054"), "{}", err.message);
        assert!(
            err.message.contains("noise_multiplier to"),
            "{}",
            err.message
        );
        assert!(cfg.validate(1, 3, 3, None).is_ok());
        cfg.target_epsilon = None;
        let err = cfg.validate(10, 3, 3, Some("krum")).unwrap_err();
        assert_eq!(err.key, "aggregator.script");
        assert!(
            err.message
                .contains("`krum` needs each client's own update")
                && err.message.contains("clipped, noised mean")
                && err.message.contains("fedadagrad, or dp = \"local\")"),
            "{}",
            err.message
        );
        assert!(cfg.validate(10, 3, 3, Some("fedadam")).is_ok());
        cfg.adaptive_clip = true;
        cfg.count_noise = Some(0.4);
        let err = cfg.validate(10, 3, 3, None).unwrap_err();
        assert_eq!(err.key, "privacy.count_noise");
        cfg.dp = DpMode::Local;
        assert_eq!(
            cfg.validate(10, 3, 3, None).unwrap_err().key,
            "privacy.adaptive_clip"
        );
    }

    #[test]
    fn local_dp_releases_only_the_sent_tensors_clipped_and_noised() {
        let mut sent = vector(&[0.0, 0.0]);
        sent.insert("frozen", vec![1], vec![5.0]).unwrap();
        let cfg = PrivacySection {
            dp: DpMode::Local,
            noise_multiplier: 0.0,
            ..PrivacySection::default()
        };
        let out = privatize_local(&vector(&[3.0, 4.0]), &sent, &cfg, 1).unwrap();
        assert_eq!(out.names().collect::<Vec<_>>(), ["w"]);
        assert_eq!(w(&out), [0.6, 0.8]);
        let noisy = PrivacySection {
            noise_multiplier: 1.0,
            ..cfg
        };
        assert_ne!(
            privatize_local(&vector(&[3.0, 4.0]), &sent, &noisy, 1).unwrap(),
            out
        );
    }
}
