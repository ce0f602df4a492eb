//! Aggregation: how the server combines client updates into the next global parameters.
//!
//! An [`Aggregator`] is one decision point of a round, in the spirit of
//! Flower's `Strategy::aggregate_fit`: it sees the current global parameters
//! and the round's updates and returns the new global parameters. [`FedAvg`]
//! is the native default; server optimizers and robust rules plug in as other
//! implementations (and, later, as Rhai scripts) without the course changing.
//!
//! Updates are always combined in client-id order, never arrival order, so a
//! course gives bit-identical results however its messages were interleaved.

use thiserror::Error;

use crate::params::{ParamError, ParamSet};

/// One client's contribution to a round.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    /// The client.
    pub client: u32,
    /// How many training samples stand behind the update (FedAvg's weight).
    pub n_samples: u64,
    /// The client's parameters after local training.
    pub params: ParamSet,
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

/// Combines a round's updates into new global parameters.
pub trait Aggregator: Send {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// The new global parameters. `updates` are sorted by client id.
    fn aggregate(
        &mut self,
        global: &ParamSet,
        updates: &[ClientUpdate],
        round: u64,
    ) -> Result<ParamSet, AggregateError>;

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

/// Applies `reduce` to the sorted client values of every element.
fn coordinate_wise(
    updates: &[&ClientUpdate],
    reduce: impl Fn(&[f32]) -> f32,
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
        ClientUpdate {
            client,
            n_samples: n,
            params,
        }
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
