//! The best round of a course and early stopping: FS-LLM's
//! `best_res_update_round_wise_key` and `early_stop.patience`.
//!
//! With `federate.keep_best = "val_loss"` the server remembers the global
//! parameters of the evaluation with the lowest sample-weighted loss on
//! the `val` split (any `<split>_loss` works), and with
//! `federate.early_stop_patience = N` it ends the course once N
//! evaluations in a row have not improved on that best. The tracker is
//! saved with every checkpoint, so a resumed course keeps the best an
//! uninterrupted one would.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::params::{ParamError, ParamSet};

/// Why the best round cannot be tracked, saved or taken back.
#[derive(Debug, thiserror::Error)]
pub enum BestError {
    /// The key names no split's loss.
    #[error("`{0}` is not a split's loss (`val_loss`, `test_loss`, …)")]
    NotALoss(String),
    /// The clients did not evaluate the followed split.
    #[error("federate.keep_best follows the `{split}` split's loss, but the clients evaluated only {evaluated:?}")]
    NotEvaluated {
        split: String,
        evaluated: Vec<String>,
    },
    /// The tracker cannot be written as bytes.
    #[error("{0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// Saved bytes that are no tracker.
    #[error("{0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// A saved tracker that followed another split.
    #[error("it tracked the `{saved}` split's loss, this course tracks `{now}`")]
    OtherSplit { saved: String, now: String },
    /// Saved best parameters that are not finite.
    #[error("its best parameters hold {0}")]
    NonFinite(ParamError),
}

/// The evaluation with the lowest loss so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestRound {
    /// The round evaluated (0: the initial parameters).
    pub round: u64,
    /// Its sample-weighted loss on the tracked split.
    pub loss: f64,
    /// The global parameters it evaluated.
    pub params: ParamSet,
}

/// Follows one split's loss over a course's evaluations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestTracker {
    split: String,
    patience: u64,
    /// The best evaluation so far.
    pub best: Option<BestRound>,
    /// Evaluations since the best one.
    pub stale: u64,
}

/// The split a `keep_best` key names (`val_loss` → `val`), if it is one.
pub fn split_of(key: &str) -> Option<&str> {
    key.strip_suffix("_loss")
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

impl BestTracker {
    /// Tracks the loss `key` names (`<split>_loss`); stops after
    /// `patience` evaluations without improvement (0: never).
    pub fn new(key: &str, patience: u64) -> Result<Self, BestError> {
        let split = split_of(key).ok_or_else(|| BestError::NotALoss(key.to_string()))?;
        Ok(Self {
            split: split.to_string(),
            patience,
            best: None,
            stale: 0,
        })
    }

    /// Takes the evaluation of `round` (of `global`), whose sample-weighted
    /// losses by split are `losses`; returns whether it is the new best.
    pub fn observe(
        &mut self,
        round: u64,
        losses: &BTreeMap<String, f64>,
        global: &ParamSet,
    ) -> Result<bool, BestError> {
        let &loss = losses
            .get(&self.split)
            .ok_or_else(|| BestError::NotEvaluated {
                split: self.split.clone(),
                evaluated: losses.keys().cloned().collect(),
            })?;
        let better = self.best.as_ref().is_none_or(|b| loss < b.loss);
        if better {
            self.best = Some(BestRound {
                round,
                loss,
                params: global.clone(),
            });
            self.stale = 0;
        } else {
            self.stale += 1;
        }
        Ok(better)
    }

    /// Whether the course should end: `patience` evaluations without improvement.
    pub fn should_stop(&self) -> bool {
        self.patience > 0 && self.stale >= self.patience
    }

    /// The tracker as checkpoint bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, BestError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    /// A tracker back from [`Self::to_bytes`], continuing with this one's
    /// settings (they may have changed since the checkpoint).
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), BestError> {
        let saved: Self = rmp_serde::from_slice(bytes)?;
        if saved.split != self.split {
            return Err(BestError::OtherSplit {
                saved: saved.split,
                now: self.split.clone(),
            });
        }
        if let Some(b) = &saved.best {
            b.params.check_finite().map_err(BestError::NonFinite)?;
        }
        self.best = saved.best;
        self.stale = saved.stale;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(v: f32) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("w", vec![1], vec![v]).unwrap();
        p
    }

    fn losses(val: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("val".to_string(), val), ("test".to_string(), 9.0)])
    }

    #[test]
    fn keeps_the_lowest_and_counts_evaluations_since() {
        let mut t = BestTracker::new("val_loss", 2).unwrap();
        assert!(t.observe(0, &losses(3.0), &at(0.0)).unwrap());
        assert!(t.observe(1, &losses(2.0), &at(1.0)).unwrap());
        // A tie is no improvement.
        assert!(!t.observe(2, &losses(2.0), &at(2.0)).unwrap());
        assert!(!t.should_stop());
        assert!(!t.observe(3, &losses(2.5), &at(3.0)).unwrap());
        assert!(t.should_stop());
        let best = t.best.clone().unwrap();
        assert_eq!((best.round, best.loss, best.params), (1, 2.0, at(1.0)));
        // Saved and restored, it goes on where it was.
        let mut back = BestTracker::new("val_loss", 5).unwrap();
        back.restore(&t.to_bytes().unwrap()).unwrap();
        assert_eq!((back.best, back.stale), (t.best.clone(), 2));
        let mut other = BestTracker::new("test_loss", 5).unwrap();
        assert!(other.restore(&t.to_bytes().unwrap()).is_err());
    }

    #[test]
    fn a_missing_split_or_a_key_that_is_no_loss_is_named() {
        let mut t = BestTracker::new("train_loss", 0).unwrap();
        let e = t
            .observe(1, &losses(1.0), &at(0.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`train`") && e.contains("\"val\""), "{e}");
        assert!(!t.should_stop(), "patience 0 never stops");
        for key in ["val", "_loss", "val loss_loss", "accuracy"] {
            assert!(BestTracker::new(key, 1).is_err(), "{key}");
        }
    }
}
