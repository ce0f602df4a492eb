//! The course's message bodies: what each kind of message carries besides
//! its parameters, as types both sides share.
//!
//! A body travels as the envelope's metadata (a map of named fields, see
//! [`Envelope::with_body`](crate::message::Envelope::with_body) and
//! [`Envelope::body`](crate::message::Envelope::body)), so the wire format is
//! the same as a hand-written map; but the field names are written once,
//! here, and a receiver gets a typed value or an error naming the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::course::trainer::SplitEval;

/// `join_in`, client → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinIn {
    /// A number fixed for the life of the client process: a repeated join
    /// from the same instance gets no second copy of the base model.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub instance: Option<u64>,
}

/// `assign_id`, server → client: the server accepts the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignId {
    /// The id the client is accepted under.
    pub client_id: u32,
    /// Rounds in the course.
    pub rounds: u64,
    /// Clients in the course.
    pub clients: u32,
}

/// `train`, server → client: besides the parameters (the global ones, or
/// the client's own when the strategy sends it other shapes), the
/// client's configuration for this fit. A broadcast `train` carries none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Train {
    /// Per-client settings from the strategy's `configure_fit` (`rank`,
    /// `local_steps`, `lr`, `mu`, …).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub config: crate::aggregate::FitConfig,
}

/// `update`, client → server: the locally trained parameters' account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// Training examples the client holds (FedAvg's weight).
    pub n_samples: u64,
    /// Seconds the local training took.
    pub compute_s: f64,
    /// Mean training loss over the round's local steps.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub train_loss: Option<f64>,
    /// Optimizer steps taken (FedNova's normalizer).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub local_steps: Option<u64>,
    /// Anything else the trainer measured.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub metrics: BTreeMap<String, f64>,
    /// Set when the local training failed (then no parameters come): why,
    /// naming the client, the round and, where known, the step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failed: Option<String>,
}

/// `metrics`, client → server: evaluation results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// One entry per evaluated split.
    pub results: Vec<SplitEval>,
    /// Seconds the evaluation took.
    pub compute_s: f64,
    /// Set when the evaluation failed (then `results` is empty): why.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failed: Option<String>,
}

/// Which step of the course a server timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Clients joining.
    Join,
    /// A training round.
    Train,
    /// An evaluation.
    Eval,
}

/// The server's own timer message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeout {
    /// The step whose time is up.
    pub step: Step,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Envelope, MsgKind, Party};

    fn envelope() -> Envelope {
        Envelope::new(
            "c",
            1,
            Party::Client(2),
            vec![Party::Server],
            MsgKind::Update,
        )
    }

    #[test]
    fn bodies_travel_as_named_fields() {
        let body = Update {
            n_samples: 12,
            compute_s: 0.5,
            train_loss: None,
            local_steps: None,
            metrics: BTreeMap::new(),
            failed: None,
        };
        let env = envelope().with_body(&body).unwrap();
        // The wire sees plain fields; unset optional ones are absent.
        assert_eq!(env.meta_u64("n_samples"), Some(12));
        assert!(!env.meta.contains_key("train_loss"));
        assert!(!env.meta.contains_key("metrics"));
        assert_eq!(env.body::<Update>().unwrap(), body);
    }

    #[test]
    fn a_mistyped_field_is_named() {
        let env = envelope()
            .with_meta("n_samples", -3)
            .with_meta("compute_s", 0.1);
        let err = env.body::<Update>().unwrap_err().to_string();
        assert!(err.contains("update"), "{err}");
        let env = envelope().with_meta("compute_s", 0.1);
        let err = env.body::<Update>().unwrap_err().to_string();
        assert!(err.contains("n_samples"), "{err}");
        let timer = envelope().with_meta("step", "train");
        assert_eq!(timer.body::<Timeout>().unwrap().step, Step::Train);
    }
}
