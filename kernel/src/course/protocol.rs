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
    /// One step of a secure-aggregation round.
    SecAgg,
}

/// The server's own timer message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeout {
    /// The step whose time is up.
    pub step: Step,
    /// Which stage of the step (secure aggregation's), when it has stages.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stage: Option<u8>,
}

/// Secure aggregation's messages, in the order a round sends them (see
/// [`crate::course::secagg`] for the protocol).
pub mod secagg {
    use serde::{Deserialize, Serialize};

    use crate::privacy::secagg::Share;

    /// Client → server, on `train`: its public keys for the round.
    pub const KEYS: &str = "secagg_keys";
    /// Server → the round's clients: every participant's public keys.
    pub const PEERS: &str = "secagg_peers";
    /// Client → server: its secrets' shares, sealed for each peer.
    pub const SHARES: &str = "secagg_shares";
    /// Server → each client: the shares sealed for it, and who takes part.
    pub const INBOX: &str = "secagg_inbox";
    /// Client → server: its masked update (the ring elements as the blob).
    pub const MASKED: &str = "secagg_masked";
    /// Server → the surviving clients: whose shares to reveal.
    pub const UNMASK: &str = "secagg_unmask";
    /// Client → server: the revealed shares.
    pub const REVEAL: &str = "secagg_reveal";

    /// `secagg_keys`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Keys {
        /// The X25519 public key shares are sealed to.
        pub seal_key: [u8; 32],
        /// The X25519 public key pairwise masks are agreed with.
        pub mask_key: [u8; 32],
    }

    /// One participant's keys, as the server relays them.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct PeerKeys {
        /// The participant.
        pub client: u32,
        /// Its keys.
        #[serde(flatten)]
        pub keys: Keys,
    }

    /// `secagg_peers`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Peers {
        /// Shares that recover a secret.
        pub threshold: u32,
        /// Every participant that sent keys, the receiver included.
        pub peers: Vec<PeerKeys>,
    }

    /// Sealed shares between two clients; `peer` is the receiver on the
    /// way up and the sender on the way down.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Sealed {
        /// The other client.
        pub peer: u32,
        /// ChaCha20-Poly1305 ciphertext of the two shares.
        pub data: Vec<u8>,
    }

    /// `secagg_shares`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Shares {
        /// The hash of the sender's self-mask seed, to check its recovery.
        pub commit: [u8; 32],
        /// One per other peer.
        pub sealed: Vec<Sealed>,
    }

    /// `secagg_inbox`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Inbox {
        /// The clients whose shares went out: each masks against all the others.
        pub participants: Vec<u32>,
        /// The shares sealed for the receiver, one per other participant.
        pub sealed: Vec<Sealed>,
    }

    /// `secagg_masked` (the masked ring elements travel as the blob).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Masked {
        /// Seconds the local training took.
        pub compute_s: f64,
        /// Set when the local training failed (then no blob comes): why.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        pub failed: Option<String>,
    }

    /// `secagg_unmask`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Unmask {
        /// The participants whose masked updates arrived: reveal their self-mask shares.
        pub survivors: Vec<u32>,
        /// The participants whose did not: reveal their mask-secret shares.
        pub dropped: Vec<u32>,
    }

    /// One revealed share.
    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    pub struct Revealed {
        /// Whose secret it is a share of.
        pub client: u32,
        /// The share (at the revealing client's id).
        pub share: Share,
    }

    /// `secagg_reveal`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Reveal {
        /// Shares of the survivors' self-mask seeds.
        pub self_masks: Vec<Revealed>,
        /// Shares of the dropped participants' mask secrets.
        pub mask_secrets: Vec<Revealed>,
    }
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
