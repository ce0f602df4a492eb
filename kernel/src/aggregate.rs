//! The server's strategy: which clients train, what each is sent, and how
//! their updates become the next global parameters.
//!
//! An [`Aggregator`] holds every decision the server makes in a round, in
//! the spirit of Flower's `Strategy`, each with a native default so that an
//! implementation overrides only what it changes:
//!
//! | hook | decides | default |
//! |---|---|---|
//! | [`Aggregator::on_round_start`] | — (state) | nothing |
//! | [`Aggregator::sample`] | which joined clients take part | the seeded uniform sample |
//! | [`Aggregator::configure_fit`] | each client's instruction: a config map (rank, local steps, lr, mu, …) and its own parameters (other shapes, extra tensors) | the global parameters for every sampled client |
//! | [`Aggregator::check_update`] | whether an update fits what the client was sent | same names and shapes |
//! | [`Aggregator::aggregate`] (`aggregate_fit`) | the next global parameters | FedAvg |
//! | [`Aggregator::on_round_end`] | metrics of the round | none |
//! | [`Aggregator::aggregate_evaluate`] | metrics of an evaluation | none (the server records the sample-weighted means) |
//!
//! [`FedAvg`] is the native strategy; Rhai scripts implement any of the hooks
//! (`kernel/src/script/aggregator.rs`). Tensors that are not part of the
//! model but travel with it (SCAFFOLD's control variates) ride in the same
//! [`ParamSet`] under names that start with [`EXTRA_PREFIX`]: the kernel
//! splits them off on both sides ([`split_extra`]).
//!
//! Updates are always combined in client-id order, never arrival order, so a
//! course gives bit-identical results however its messages were interleaved.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::params::{ParamError, ParamSet, ParamTensor};

/// A per-client configuration a strategy sends with `train`: plain values
/// (numbers, strings, booleans) by name, e.g. `rank`, `local_steps`, `lr`, `mu`.
pub type FitConfig = BTreeMap<String, serde_json::Value>;

/// The name prefix of tensors that travel beside the model's parameters
/// (control variates, residuals): `extra/NAME`.
pub const EXTRA_PREFIX: &str = "extra/";

/// Splits `params` into the model's tensors and the extra ones (their names
/// without [`EXTRA_PREFIX`]).
pub fn split_extra(params: ParamSet) -> (ParamSet, ParamSet) {
    let mut model = ParamSet::new();
    let mut extra = ParamSet::new();
    for (name, t) in params.into_tensors() {
        match name.strip_prefix(EXTRA_PREFIX) {
            Some(rest) => extra.insert_tensor(rest, t),
            None => model.insert_tensor(name, t),
        }
    }
    (model, extra)
}

/// Joins `extra` (names without the prefix) into `params` under [`EXTRA_PREFIX`].
pub fn join_extra(mut params: ParamSet, extra: &ParamSet) -> ParamSet {
    for (name, t) in extra.iter() {
        params.insert_tensor(format!("{EXTRA_PREFIX}{name}"), t.clone());
    }
    params
}

/// One client's contribution to a round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientUpdate {
    /// The client.
    pub client: u32,
    /// How many training samples stand behind the update (FedAvg's weight).
    pub n_samples: u64,
    /// The client's parameters after local training.
    pub params: ParamSet,
    /// Optimizer steps the client took, when it says.
    pub local_steps: Option<u64>,
    /// The client's mean training loss, when it tracks one.
    pub train_loss: Option<f64>,
    /// Whatever else the client's trainer measured.
    pub metrics: BTreeMap<String, f64>,
    /// Extra tensors the client sent back (names without [`EXTRA_PREFIX`]).
    pub extra: ParamSet,
    /// The configuration the client was sent this round.
    pub config: FitConfig,
}

impl ClientUpdate {
    /// An update of `params` from `client`, weighing `n_samples`.
    pub fn new(client: u32, n_samples: u64, params: ParamSet) -> Self {
        Self {
            client,
            n_samples,
            params,
            ..Self::default()
        }
    }
}

/// What one client is asked to do in a round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FitInstruction {
    /// The client.
    pub client: u32,
    /// Its configuration for this fit (empty: the course's own).
    pub config: FitConfig,
    /// Its parameters, when not the global ones: other shapes (a lower
    /// LoRA rank), and extra tensors under [`EXTRA_PREFIX`].
    pub params: Option<ParamSet>,
}

impl FitInstruction {
    /// The default: the global parameters, no configuration.
    pub fn plain(client: u32) -> Self {
        Self {
            client,
            ..Self::default()
        }
    }

    /// True when the client gets just the global parameters.
    pub fn is_plain(&self) -> bool {
        self.config.is_empty() && self.params.is_none()
    }
}

/// One client's evaluation of one split, as [`Aggregator::aggregate_evaluate`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientEval {
    /// The client.
    pub client: u32,
    /// The split.
    pub split: String,
    /// Mean loss.
    pub loss: f64,
    /// Samples behind it.
    pub samples: u64,
    /// Further metrics.
    pub metrics: BTreeMap<String, f64>,
}

/// Why a payload or an update does not fit the parameters it stands for.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum FitError {
    /// The payload's tensor names are not the global ones (a few of each
    /// side are named).
    #[error("its tensors are not the global ones (missing {missing:?}, unknown {unknown:?})")]
    Names {
        missing: Vec<String>,
        unknown: Vec<String>,
    },
    /// A tensor whose shape a client of the global shape cannot load.
    #[error("tensor `{name}` has shape {shape:?}, which a client of the global shape {global:?} cannot load")]
    Shape {
        name: String,
        shape: Vec<usize>,
        global: Vec<usize>,
    },
    /// A LoRA module whose two factors disagree on the rank.
    #[error("LoRA module `{module}`: lora_A has rank {a} but lora_B rank {b}")]
    Rank { module: String, a: usize, b: usize },
    /// An update holding a tensor its client was not sent.
    #[error("it holds a tensor `{0}` the client was not sent")]
    NotSent(String),
    /// An update tensor in another shape than it was sent in.
    #[error("tensor `{name}` has shape {shape:?}, it was sent as {sent:?}")]
    Resized {
        name: String,
        shape: Vec<usize>,
        sent: Vec<usize>,
    },
    /// A tensor that does not hold finite numbers.
    #[error(transparent)]
    Params(#[from] ParamError),
}

/// Whether `payload` is something a client of `global`'s adapter can load:
/// the same tensor names, and the same shapes except that a LoRA module's
/// rank (the rows of `…lora_A…`, the columns of `…lora_B…`) may differ, as
/// long as its two factors agree. Extra tensors are not looked at.
pub fn check_payload(global: &ParamSet, payload: &ParamSet) -> Result<(), FitError> {
    let model: Vec<(&str, &ParamTensor)> = payload
        .iter()
        .filter(|(name, _)| !name.starts_with(EXTRA_PREFIX))
        .collect();
    let mine: Vec<&str> = global.names().collect();
    let theirs: Vec<&str> = model.iter().map(|(name, _)| *name).collect();
    if mine != theirs {
        let first_three = |of: &[&str], not_in: &[&str]| -> Vec<String> {
            of.iter()
                .filter(|n| !not_in.contains(n))
                .take(3)
                .map(|n| n.to_string())
                .collect()
        };
        return Err(FitError::Names {
            missing: first_three(&mine, &theirs),
            unknown: first_three(&theirs, &mine),
        });
    }
    for &(name, t) in &model {
        let g = global.get(name).expect("names compared above");
        let (gs, ts) = (g.shape(), t.shape());
        let rank_dim = match lora_factor(name) {
            Some(Factor::A) if gs.len() == 2 => Some(0),
            Some(Factor::B) if gs.len() == 2 => Some(1),
            _ => None,
        };
        let fits = gs.len() == ts.len()
            && (0..gs.len()).all(|d| gs[d] == ts[d] || (Some(d) == rank_dim && ts[d] > 0));
        if !fits {
            return Err(FitError::Shape {
                name: name.to_string(),
                shape: ts.to_vec(),
                global: gs.to_vec(),
            });
        }
    }
    // The payload has the global's names, so it has the global's modules.
    for pair in lora_pairs(global) {
        let (a, b) = (
            payload.get(&pair.a).expect("names compared above").shape(),
            payload.get(&pair.b).expect("names compared above").shape(),
        );
        if let ([r_a, _], [_, r_b]) = (a, b) {
            if r_a != r_b {
                return Err(FitError::Rank {
                    module: pair.module,
                    a: *r_a,
                    b: *r_b,
                });
            }
        }
    }
    Ok(())
}

/// Whether `update` holds some of `sent`'s tensors (none: the client
/// changed nothing it shares), each in the shape it was sent in.
pub fn check_subset(sent: &ParamSet, update: &ParamSet) -> Result<(), FitError> {
    for (name, t) in update.iter() {
        match sent.get(name) {
            None => return Err(FitError::NotSent(name.to_string())),
            Some(s) if s.shape() != t.shape() => {
                return Err(FitError::Resized {
                    name: name.to_string(),
                    shape: t.shape().to_vec(),
                    sent: s.shape().to_vec(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// `update` completed with `sent`'s tensors it leaves out.
pub fn fill_from(mut update: ParamSet, sent: &ParamSet) -> ParamSet {
    for (name, t) in sent.iter() {
        if update.get(name).is_none() {
            update.insert_tensor(name, t.clone());
        }
    }
    update
}

/// Which factor of a LoRA module a PEFT tensor name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// `lora_A` (`r × in`).
    A,
    /// `lora_B` (`out × r`).
    B,
}

/// The factor a PEFT name (`…q_proj.lora_A.weight`, `…lora_B.default.weight`) is, if any.
pub fn lora_factor(name: &str) -> Option<Factor> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.contains(&"lora_A") {
        Some(Factor::A)
    } else if parts.contains(&"lora_B") {
        Some(Factor::B)
    } else {
        None
    }
}

/// One LoRA module of a parameter set: its name and its two factors' names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraPair {
    /// The module (`base_model.model.model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The name of its `lora_A` (`r × in`).
    pub a: String,
    /// The name of its `lora_B` (`out × r`).
    pub b: String,
}

/// The LoRA modules of `params` in name order: every `…lora_A…` tensor
/// whose `…lora_B…` twin is present.
pub fn lora_pairs(params: &ParamSet) -> Vec<LoraPair> {
    params
        .names()
        .filter(|n| lora_factor(n) == Some(Factor::A))
        .filter_map(|a| {
            let b = a.replacen(".lora_A", ".lora_B", 1);
            let module = a.split(".lora_A").next().unwrap_or(a).to_string();
            params.get(&b).is_some().then(|| LoraPair {
                module,
                a: a.to_string(),
                b,
            })
        })
        .collect()
}

/// Why an aggregation failed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AggregateError {
    /// The round brought no updates.
    #[error("no updates to aggregate")]
    Empty,
    /// Updates do not fit together or carry no weight.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// Any other failure (for example from a script).
    #[error("{0}")]
    Other(String),
}

/// The server's strategy: combines a round's updates into new global
/// parameters, and (each with a default) decides who trains with what.
pub trait Aggregator: Send {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// The new global parameters (Flower's `aggregate_fit`). `updates` are
    /// sorted by client id.
    fn aggregate(
        &mut self,
        global: &ParamSet,
        updates: &[ClientUpdate],
        round: u64,
    ) -> Result<ParamSet, AggregateError>;

    /// Called as round `round` begins, before sampling.
    fn on_round_start(&mut self, round: u64) -> Result<(), AggregateError> {
        let _ = round;
        Ok(())
    }

    /// The clients that take part in `round`, among the `joined` ones;
    /// `default` is the course's seeded uniform sample.
    fn sample(
        &mut self,
        round: u64,
        joined: &[u32],
        default: Vec<u32>,
    ) -> Result<Vec<u32>, AggregateError> {
        let _ = (round, joined);
        Ok(default)
    }

    /// What each of the sampled `clients` is asked to do in `round`; a
    /// client left out is not asked. Default: every one gets `global`.
    fn configure_fit(
        &mut self,
        global: &ParamSet,
        clients: &[u32],
        round: u64,
    ) -> Result<Vec<FitInstruction>, AggregateError> {
        let _ = (global, round);
        Ok(clients.iter().map(|&c| FitInstruction::plain(c)).collect())
    }

    /// Whether `update` fits the parameters `sent` to its client: by
    /// default, some of the tensors it was sent, each with the shape it was
    /// sent in. A client leaves out what it did not change
    /// (FFA-LoRA's frozen A, FedSA-LoRA's local B); the server takes those
    /// as it sent them.
    fn check_update(&self, sent: &ParamSet, update: &ParamSet) -> Result<(), FitError> {
        check_subset(sent, update)
    }

    /// Called after round `round` is aggregated into `global`; the metrics it
    /// returns go into the round's record.
    fn on_round_end(
        &mut self,
        global: &ParamSet,
        round: u64,
    ) -> Result<BTreeMap<String, f64>, AggregateError> {
        let _ = (global, round);
        Ok(BTreeMap::new())
    }

    /// Metrics of an evaluation from the clients' `results` (sorted by
    /// client, then split), recorded beside the server's sample-weighted
    /// means (Flower's `aggregate_evaluate`).
    fn aggregate_evaluate(
        &mut self,
        results: &[ClientEval],
        round: u64,
    ) -> Result<BTreeMap<String, f64>, AggregateError> {
        let _ = (results, round);
        Ok(BTreeMap::new())
    }

    /// State carried across rounds (server momentum, moments), as bytes for a
    /// checkpoint; `Ok(None)` for an aggregator that keeps none.
    fn save_state(&self) -> Result<Option<Vec<u8>>, AggregateError> {
        Ok(None)
    }

    /// Restores what [`Self::save_state`] returned, when a course resumes.
    fn load_state(&mut self, bytes: &[u8]) -> Result<(), AggregateError> {
        let _ = bytes;
        Err(AggregateError::Other(format!(
            "the {} aggregator keeps no state to restore",
            self.name()
        )))
    }
}

/// Federated averaging (McMahan et al.): the sample-weighted mean of the clients' parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct FedAvg;

impl Aggregator for FedAvg {
    fn name(&self) -> &str {
        "fedavg"
    }

    fn aggregate(
        &mut self,
        global: &ParamSet,
        updates: &[ClientUpdate],
        _round: u64,
    ) -> Result<ParamSet, AggregateError> {
        let mean = aggregate_fedavg(updates)?;
        global.check_compatible(&mean)?;
        Ok(mean)
    }
}

/// `Σ nᵢ θᵢ / Σ nᵢ` over the updates, in client-id order whatever order they come in.
pub fn aggregate_fedavg(updates: &[ClientUpdate]) -> Result<ParamSet, AggregateError> {
    fedavg_of(&updates.iter().collect::<Vec<_>>())
}

/// [`aggregate_fedavg`] over borrowed updates (the script host's `weighted_mean`).
pub fn fedavg_of(updates: &[&ClientUpdate]) -> Result<ParamSet, AggregateError> {
    if updates.is_empty() {
        return Err(AggregateError::Empty);
    }
    let mut ordered = updates.to_vec();
    ordered.sort_by_key(|u| u.client);
    let weighted: Vec<(&ParamSet, f64)> = ordered
        .iter()
        .map(|u| (&u.params, u.n_samples as f64))
        .collect();
    Ok(ParamSet::weighted_mean(&weighted)?)
}

/// The coordinate-wise median of the updates' parameters (Yin et al., 2018),
/// unweighted; for an even count, the mean of the two middle values.
pub fn coordinate_median(updates: &[ClientUpdate]) -> Result<ParamSet, AggregateError> {
    coordinate_median_of(&updates.iter().collect::<Vec<_>>())
}

/// [`coordinate_median`] over borrowed updates.
pub fn coordinate_median_of(updates: &[&ClientUpdate]) -> Result<ParamSet, AggregateError> {
    coordinate_wise(updates, |column| {
        let n = column.len();
        if n % 2 == 1 {
            column[n / 2]
        } else {
            (column[n / 2 - 1] + column[n / 2]) / 2.0
        }
    })
}

/// The coordinate-wise `beta`-trimmed mean (Yin et al., 2018): per element,
/// drop the `⌊beta·n⌋` smallest and largest client values and average the rest.
pub fn trimmed_mean(updates: &[ClientUpdate], beta: f64) -> Result<ParamSet, AggregateError> {
    trimmed_mean_of(&updates.iter().collect::<Vec<_>>(), beta)
}

/// [`trimmed_mean`] over borrowed updates.
pub fn trimmed_mean_of(updates: &[&ClientUpdate], beta: f64) -> Result<ParamSet, AggregateError> {
    if !(0.0..0.5).contains(&beta) {
        return Err(AggregateError::Other(format!(
            "trimmed_mean: beta must be in [0, 0.5), got {beta}"
        )));
    }
    let trim = (beta * updates.len() as f64).floor() as usize;
    coordinate_wise(updates, |column| {
        let kept = &column[trim..column.len() - trim];
        let sum: f64 = kept.iter().map(|&x| f64::from(x)).sum();
        (sum / kept.len() as f64) as f32
    })
}

/// Bulyan's coordinate-wise rule (El Mhamdi et al., 2018): per element, the
/// mean of the `beta` client values closest to their median (ties to the
/// smaller value).
pub fn closest_to_median_of(
    updates: &[&ClientUpdate],
    beta: usize,
) -> Result<ParamSet, AggregateError> {
    if beta == 0 || beta > updates.len() {
        return Err(AggregateError::Other(format!(
            "closest_to_median: beta must be in 1..={}, got {beta}",
            updates.len()
        )));
    }
    let mut by_distance: Vec<f32> = Vec::with_capacity(updates.len());
    coordinate_wise(updates, |column| {
        let n = column.len();
        let median = if n % 2 == 1 {
            f64::from(column[n / 2])
        } else {
            (f64::from(column[n / 2 - 1]) + f64::from(column[n / 2])) / 2.0
        };
        by_distance.clear();
        by_distance.extend_from_slice(column);
        by_distance.sort_by(|a, b| {
            let (da, db) = (
                (f64::from(*a) - median).abs(),
                (f64::from(*b) - median).abs(),
            );
            da.total_cmp(&db).then(a.total_cmp(b))
        });
        let sum: f64 = by_distance[..beta].iter().map(|&x| f64::from(x)).sum();
        (sum / beta as f64) as f32
    })
}

/// Applies `reduce` to the sorted client values of every element.
fn coordinate_wise(
    updates: &[&ClientUpdate],
    mut reduce: impl FnMut(&[f32]) -> f32,
) -> Result<ParamSet, AggregateError> {
    let first = updates.first().ok_or(AggregateError::Empty)?;
    for u in &updates[1..] {
        first.params.check_compatible(&u.params)?;
    }
    let mut out = first.params.clone();
    let mut column = Vec::with_capacity(updates.len());
    for (name, tensor) in out.iter_mut() {
        let sources: Vec<&[f32]> = updates
            .iter()
            .map(|u| u.params.get(name).expect("checked compatible").data())
            .collect();
        for (i, slot) in tensor.data_mut().iter_mut().enumerate() {
            column.clear();
            column.extend(sources.iter().map(|s| s[i]));
            column.sort_by(f32::total_cmp);
            *slot = reduce(&column);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(client: u32, n: u64, w: [f32; 2], b: f32) -> ClientUpdate {
        let mut params = ParamSet::new();
        params.insert("w", vec![2], w.to_vec()).unwrap();
        params.insert("b", vec![], vec![b]).unwrap();
        ClientUpdate::new(client, n, params)
    }

    #[test]
    fn extras_split_off_and_join_back() {
        let mut p = ParamSet::new();
        p.insert("w", vec![1], vec![1.0]).unwrap();
        p.insert("extra/c/w", vec![1], vec![2.0]).unwrap();
        let (model, extra) = split_extra(p.clone());
        assert_eq!(model.names().collect::<Vec<_>>(), ["w"]);
        assert_eq!(extra.names().collect::<Vec<_>>(), ["c/w"]);
        assert_eq!(join_extra(model, &extra), p);
    }

    fn lora(r: usize) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("m.q_proj.lora_A.weight", vec![r, 4], vec![0.0; 4 * r])
            .unwrap();
        p.insert("m.q_proj.lora_B.weight", vec![3, r], vec![0.0; 3 * r])
            .unwrap();
        p.insert("m.norm", vec![2], vec![0.0; 2]).unwrap();
        p
    }

    #[test]
    fn an_update_may_leave_out_tensors_it_did_not_change() {
        let sent = lora(4);
        let mut part = sent.clone();
        part.remove("m.q_proj.lora_A.weight");
        assert_eq!(check_subset(&sent, &part), Ok(()));
        assert_eq!(fill_from(part, &sent), sent);
        assert_eq!(fill_from(ParamSet::new(), &sent), sent);
        let mut odd = lora(4);
        odd.insert("m.other", vec![1], vec![0.0]).unwrap();
        assert!(check_subset(&sent, &odd)
            .unwrap_err()
            .to_string()
            .contains("was not sent"));
        assert!(check_subset(&sent, &lora(2))
            .unwrap_err()
            .to_string()
            .contains("shape"));
    }

    #[test]
    fn payloads_may_change_a_lora_rank_and_nothing_else() {
        let global = lora(8);
        assert_eq!(check_payload(&global, &lora(8)), Ok(()));
        assert_eq!(check_payload(&global, &lora(2)), Ok(()));
        assert_eq!(check_payload(&global, &lora(16)), Ok(()));
        let pairs = lora_pairs(&global);
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].module, "m.q_proj");
        assert_eq!(pairs[0].b, "m.q_proj.lora_B.weight");
        // Factors that disagree on the rank, a changed input size, a missing tensor.
        let mut odd = lora(4);
        odd.insert("m.q_proj.lora_B.weight", vec![3, 2], vec![0.0; 6])
            .unwrap();
        assert!(check_payload(&global, &odd)
            .unwrap_err()
            .to_string()
            .contains("rank 4 but lora_B rank 2"));
        let mut wide = lora(8);
        wide.insert("m.q_proj.lora_A.weight", vec![8, 5], vec![0.0; 40])
            .unwrap();
        assert!(check_payload(&global, &wide)
            .unwrap_err()
            .to_string()
            .contains("cannot load"));
        let mut short = lora(8);
        short.remove("m.norm");
        assert!(check_payload(&global, &short)
            .unwrap_err()
            .to_string()
            .contains("missing"));
        let mut norm = lora(8);
        norm.insert("m.norm", vec![3], vec![0.0; 3]).unwrap();
        assert!(check_payload(&global, &norm).is_err());
        // Extras are not the model's business.
        let mut with_extra = lora(8);
        with_extra.insert("extra/c", vec![1], vec![0.0]).unwrap();
        assert_eq!(check_payload(&global, &with_extra), Ok(()));
    }

    #[test]
    fn fedavg_equals_hand_computed_weighted_mean() {
        let updates = [
            update(1, 100, [1.0, 2.0], 0.0),
            update(2, 300, [3.0, -2.0], 4.0),
            update(3, 600, [-1.0, 0.5], 1.0),
        ];
        let global = updates[0].params.zeros_like();
        let avg = FedAvg.aggregate(&global, &updates, 1).unwrap();
        // w = 0.1·(1,2) + 0.3·(3,−2) + 0.6·(−1,0.5) = (0.4, −0.1); b = 0.3·4 + 0.6·1 = 1.8
        let w = avg.get("w").unwrap().data();
        assert!(
            (w[0] - 0.4).abs() < 1e-6 && (w[1] + 0.1).abs() < 1e-6,
            "{w:?}"
        );
        assert!((avg.get("b").unwrap().data()[0] - 1.8).abs() < 1e-6);
    }

    #[test]
    fn fedavg_of_equal_weights_is_the_plain_mean_and_order_free() {
        let a = update(2, 5, [1.0, 1.0], 1.0);
        let b = update(1, 5, [3.0, 5.0], -1.0);
        let ab = aggregate_fedavg(&[a.clone(), b.clone()]).unwrap();
        let ba = aggregate_fedavg(&[b, a]).unwrap();
        assert_eq!(ab, ba, "bit-identical regardless of arrival order");
        assert_eq!(ab.get("w").unwrap().data(), &[2.0, 3.0]);
        assert_eq!(ab.get("b").unwrap().data(), &[0.0]);
    }

    #[test]
    fn median_and_trimmed_mean_equal_hand_computed_values() {
        // Element w[0] across clients: 1, 3, −1, 100 (an outlier), 2.
        let updates = [
            update(1, 1, [1.0, 2.0], 0.0),
            update(2, 1, [3.0, -2.0], 4.0),
            update(3, 1, [-1.0, 0.5], 1.0),
            update(4, 1, [100.0, 0.0], -50.0),
            update(5, 9, [2.0, 1.0], 2.0),
        ];
        let med = coordinate_median(&updates).unwrap();
        // Sorted w[0]: −1 1 2 3 100 → 2; w[1]: −2 0 0.5 1 2 → 0.5; b: −50 0 1 2 4 → 1.
        assert_eq!(med.get("w").unwrap().data(), &[2.0, 0.5]);
        assert_eq!(med.get("b").unwrap().data(), &[1.0]);
        // beta 0.2 of 5 drops one low and one high: w[0] = (1+2+3)/3, w[1] = (0+0.5+1)/3, b = (0+1+2)/3.
        let tm = trimmed_mean(&updates, 0.2).unwrap();
        assert_eq!(tm.get("w").unwrap().data(), &[2.0, 0.5]);
        assert_eq!(tm.get("b").unwrap().data(), &[1.0]);
        // Even count: the mean of the two middle values.
        let med4 = coordinate_median(&updates[..4]).unwrap();
        assert_eq!(med4.get("w").unwrap().data(), &[2.0, 0.25]);
        // beta 0 is the plain (unweighted) mean.
        let plain = trimmed_mean(&updates[..2], 0.0).unwrap();
        assert_eq!(plain.get("w").unwrap().data(), &[2.0, 0.0]);
        assert!(trimmed_mean(&updates, 0.5).is_err());
        assert_eq!(coordinate_median(&[]), Err(AggregateError::Empty));
    }

    #[test]
    fn fedavg_rejects_empty_rounds_zero_weights_and_mismatches() {
        assert_eq!(aggregate_fedavg(&[]), Err(AggregateError::Empty));
        assert!(aggregate_fedavg(&[update(1, 0, [1.0, 1.0], 1.0)]).is_err());
        let mut odd = update(2, 1, [1.0, 1.0], 1.0);
        odd.params.insert("extra", vec![1], vec![0.0]).unwrap();
        assert!(matches!(
            aggregate_fedavg(&[update(1, 1, [1.0, 1.0], 1.0), odd]),
            Err(AggregateError::Params(ParamError::NameMismatch { .. }))
        ));
    }
}
