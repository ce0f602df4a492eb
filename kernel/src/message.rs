//! What FL workers say to each other: the [`Envelope`] and its vocabulary.
//!
//! An envelope is the meaning of a message — which course and round it belongs
//! to, who sent it to whom, what kind of event it is, small metadata and an
//! optional parameter payload. How it is laid out in bytes is the codec's
//! business ([`crate::codec`]); how it travels is the transport's
//! ([`crate::bus`]). Kinds follow FederatedScope's event vocabulary, and any
//! other name is carried as [`MsgKind::Custom`] so that scripts and plug-ins can
//! add events without touching the kernel.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::params::ParamSet;

/// Small, schemaless metadata carried next to the payload (sample counts, losses, timings).
pub type Meta = BTreeMap<String, serde_json::Value>;

/// A participant of a course.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Party {
    /// The aggregation server.
    Server,
    /// A client with its id (ids start at 1, as in FederatedScope).
    Client(u32),
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Party::Server => f.write_str("server"),
            Party::Client(id) => write!(f, "client {id}"),
        }
    }
}

/// The event a message stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MsgKind {
    /// Client → server: a client asks to take part.
    JoinIn,
    /// Server → client: the server accepts the client under its id.
    AssignId,
    /// Server → client: the current global parameters, for a client to keep (no reply expected).
    ModelPara,
    /// Server → client: train locally starting from the attached global parameters.
    Train,
    /// Client → server: the locally trained parameters, with sample count and metrics.
    Update,
    /// Server → client: evaluate the attached global parameters.
    Evaluate,
    /// Client → server: evaluation results.
    Metrics,
    /// Server → clients: the course is over; carries the final global parameters.
    Finish,
    /// Server → client: the frozen model the client trains around, from the
    /// server's model pre-processing (offsite-tuning's emulator); sent when
    /// the client joins, before `assign_id`.
    BaseModel,
    /// Any other event, by name.
    Custom(String),
}

impl MsgKind {
    /// The wire name, as in FederatedScope (`join_in`, `model_para`, …).
    pub fn as_str(&self) -> &str {
        match self {
            MsgKind::JoinIn => "join_in",
            MsgKind::AssignId => "assign_id",
            MsgKind::ModelPara => "model_para",
            MsgKind::Train => "train",
            MsgKind::Update => "update",
            MsgKind::Evaluate => "evaluate",
            MsgKind::Metrics => "metrics",
            MsgKind::Finish => "finish",
            MsgKind::BaseModel => "base_model",
            MsgKind::Custom(name) => name,
        }
    }
}

impl FromStr for MsgKind {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "join_in" => MsgKind::JoinIn,
            "assign_id" => MsgKind::AssignId,
            "model_para" => MsgKind::ModelPara,
            "train" => MsgKind::Train,
            "update" => MsgKind::Update,
            "evaluate" => MsgKind::Evaluate,
            "metrics" => MsgKind::Metrics,
            "finish" => MsgKind::Finish,
            "base_model" => MsgKind::BaseModel,
            other => MsgKind::Custom(other.to_string()),
        })
    }
}

impl fmt::Display for MsgKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message body that cannot be written or read as its type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// One FL message.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The course (experiment) this message belongs to.
    pub course: String,
    /// The training round it refers to.
    pub round: u64,
    /// The sender.
    pub from: Party,
    /// The receivers. A frame sent to several parties carries an empty list
    /// (the transport addresses each copy); one sent to a single party names it.
    pub to: Vec<Party>,
    /// What event it is.
    pub kind: MsgKind,
    /// Small metadata.
    pub meta: Meta,
    /// Parameters, when the event carries them.
    pub payload: Option<ParamSet>,
    /// Opaque bytes that are not parameters (secure aggregation's masked
    /// ring elements), when the event carries them.
    pub blob: Option<Vec<u8>>,
}

impl Envelope {
    /// A message with empty metadata and no payload.
    pub fn new(
        course: impl Into<String>,
        round: u64,
        from: Party,
        to: Vec<Party>,
        kind: MsgKind,
    ) -> Self {
        Self {
            course: course.into(),
            round,
            from,
            to,
            kind,
            meta: Meta::new(),
            payload: None,
            blob: None,
        }
    }

    /// Adds one metadata entry.
    pub fn with_meta(
        mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Attaches a parameter payload.
    pub fn with_payload(mut self, params: ParamSet) -> Self {
        self.payload = Some(params);
        self
    }

    /// Attaches opaque bytes.
    pub fn with_blob(mut self, blob: Vec<u8>) -> Self {
        self.blob = Some(blob);
        self
    }

    /// Writes the fields of a typed message body into the metadata (see
    /// [`crate::course::protocol`] for the course's bodies).
    pub fn with_body<B: Serialize>(mut self, body: &B) -> Result<Self, BodyError> {
        match serde_json::to_value(body).map_err(|e| BodyError(e.to_string()))? {
            serde_json::Value::Object(fields) => {
                self.meta.extend(fields);
                Ok(self)
            }
            other => Err(BodyError(format!(
                "a message body must be a struct of fields, not {other}"
            ))),
        }
    }

    /// Reads the metadata as the typed body `B`: a missing or mistyped
    /// field is an error naming it; fields `B` does not know are ignored.
    pub fn body<B: DeserializeOwned>(&self) -> Result<B, BodyError> {
        let fields: serde_json::Map<String, serde_json::Value> = self
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| BodyError(format!("malformed {} body: {e}", self.kind)))
    }

    /// A metadata entry as a non-negative integer, if present and of that type.
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.meta.get(key).and_then(serde_json::Value::as_u64)
    }

    /// A metadata entry as a number, if present and of that type.
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta.get(key).and_then(serde_json::Value::as_f64)
    }

    /// A metadata entry as a string, if present and of that type.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta.get(key).and_then(serde_json::Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_wire_names() {
        let kinds = [
            MsgKind::JoinIn,
            MsgKind::AssignId,
            MsgKind::ModelPara,
            MsgKind::Train,
            MsgKind::Update,
            MsgKind::Evaluate,
            MsgKind::Metrics,
            MsgKind::Finish,
            MsgKind::Custom("emulator".into()),
        ];
        for kind in kinds {
            let parsed: MsgKind = kind.as_str().parse().unwrap();
            assert_eq!(parsed, kind);
        }
    }

    #[test]
    fn meta_accessors_check_types() {
        let env = Envelope::new(
            "c",
            1,
            Party::Client(2),
            vec![Party::Server],
            MsgKind::Update,
        )
        .with_meta("n_samples", 12u64)
        .with_meta("loss", 0.5)
        .with_meta("note", "hi");
        assert_eq!(env.meta_u64("n_samples"), Some(12));
        assert_eq!(env.meta_f64("loss"), Some(0.5));
        assert_eq!(env.meta_str("note"), Some("hi"));
        assert_eq!(env.meta_u64("loss"), None);
        assert_eq!(env.meta_u64("missing"), None);
    }
}
