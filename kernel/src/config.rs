//! Course configuration: TOML files, `--set` overrides, and errors that name the key.
//!
//! A configuration file has one table per concern (`[federate]`, `[wire]`, and the
//! adapters' `[model]`, `[lora]`, `[data]`, …). The kernel does not know every
//! section: a [`ConfigDoc`] holds the parsed document, each owner deserializes
//! its own section with [`ConfigDoc::section`], and the binary, which knows the
//! full list, rejects sections nobody owns with [`ConfigDoc::check_sections`].
//!
//! Every section type denies unknown fields, so a typo fails loudly. Errors name
//! the file, the line where it can be found, and the full key path
//! (`federate.roundz`) — or, when the value came from the command line, the
//! `--set` argument that supplied it.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::{Compression, DecodeLimits, EncodeOptions, Quantization};

/// A configuration problem, with enough context to fix it.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{origin}: invalid TOML: {message}")]
    Syntax { origin: String, message: String },
    /// A key is unknown, mistyped or out of range.
    #[error("{location}: `{key}`: {message}")]
    Key {
        location: String,
        key: String,
        message: String,
    },
    /// A `--set` argument is not of the form `section.key=value`.
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

/// A setting out of its range, named by its full key (`pfl.lambda`):
/// what a section's own check returns, before [`ConfigDoc::locate`] places
/// it at its line in the file (or at the `--set` that supplied it).
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{message}")]
pub struct KeyError {
    /// The full key.
    pub key: String,
    /// What is wrong, as a sentence a user can act on.
    pub message: String,
}

impl KeyError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A parsed configuration document plus the overrides applied to it.
#[derive(Debug, Clone)]
pub struct ConfigDoc {
    origin: String,
    text: String,
    table: toml::Table,
    overrides: Vec<(String, String)>,
}

impl ConfigDoc {
    /// Reads and parses a TOML file. A top-level `extends = "other.toml"`
    /// (relative to this file) starts from that file's settings: this file's
    /// sections and keys are laid over it, so a variant states only what differs.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_nested(path, 0)
    }

    fn load_nested(path: &Path, depth: usize) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut doc = Self::parse(&text, &path.display().to_string())?;
        let Some(base) = doc.table.remove("extends") else {
            return Ok(doc);
        };
        let Some(base) = base.as_str() else {
            return Err(doc.key_error(
                "extends",
                "expected a file name, as in extends = \"quickstart.toml\"".into(),
            ));
        };
        if depth >= 8 {
            return Err(doc.key_error(
                "extends",
                "more than 8 levels of `extends` (a cycle?)".into(),
            ));
        }
        let base_path = path.parent().unwrap_or(Path::new(".")).join(base);
        let mut merged = Self::load_nested(&base_path, depth + 1)?.table;
        merge_tables(&mut merged, std::mem::take(&mut doc.table));
        doc.table = merged;
        Ok(doc)
    }

    /// Parses TOML text; `origin` names it in errors (a path, or `<built-in>`).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    origin: origin.to_string(),
                    message: e.to_string().trim_end().to_string(),
                })?;
        Ok(Self {
            origin: origin.to_string(),
            text: text.to_string(),
            table,
            overrides: Vec::new(),
        })
    }

    /// Where this document came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Applies `section.key=value`. The value is read as TOML (`5`, `1e-4`,
    /// `true`, `"text"`, `[1, 2]`); anything that is not valid TOML is taken as
    /// a plain string, so `--set wire.compression=gzip` works unquoted.
    pub fn apply_override(&mut self, arg: &str) -> Result<(), ConfigError> {
        let bad = |message: &str| ConfigError::Override {
            arg: arg.to_string(),
            message: message.to_string(),
        };
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected section.key=value"))?;
        let key = key.trim();
        let path: Vec<&str> = key.split('.').collect();
        if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
            return Err(bad(
                "the key must name a section and a field, as in federate.rounds",
            ));
        }
        let value = parse_override_value(raw.trim());
        let (leaf, parents) = path.split_last().expect("at least two parts");
        let mut table = &mut self.table;
        for part in parents {
            let entry = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry
                .as_table_mut()
                .ok_or_else(|| bad(&format!("`{part}` is a value, not a section")))?;
        }
        table.insert(leaf.to_string(), value);
        self.overrides.push((key.to_string(), arg.to_string()));
        Ok(())
    }

    /// Fails on any top-level section not in `known`.
    pub fn check_sections(&self, known: &[&str]) -> Result<(), ConfigError> {
        for (name, value) in &self.table {
            if !known.contains(&name.as_str()) {
                return Err(self.key_error(
                    name,
                    format!("unknown section, expected one of {}", quoted_list(known)),
                ));
            }
            if !value.is_table() {
                return Err(self.key_error(name, "expected a [section] table".to_string()));
            }
        }
        Ok(())
    }

    /// Deserializes one section; a missing section yields the type's defaults.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, ConfigError> {
        let Some(value) = self.table.get(name) else {
            return Ok(T::default());
        };
        serde_path_to_error::deserialize(value.clone()).map_err(|e| {
            let inner = e.path().to_string();
            let key = if inner == "." || inner.is_empty() {
                name.to_string()
            } else {
                format!("{name}.{inner}")
            };
            // toml appends "in `field`", which the key path already says.
            let message = e.into_inner().to_string();
            let message = message
                .split("\nin `")
                .next()
                .unwrap_or_default()
                .to_string();
            self.key_error(&key, message)
        })
    }

    /// A section's [`KeyError`], located in this document.
    pub fn locate(&self, e: KeyError) -> ConfigError {
        self.key_error(&e.key, e.message)
    }

    /// An error about `key`, located at the `--set` that supplied it or at its line in the file.
    pub fn key_error(&self, key: &str, message: String) -> ConfigError {
        let from_override = self
            .overrides
            .iter()
            .rev()
            .find(|(k, _)| k == key || key.starts_with(&format!("{k}.")));
        let location = match from_override {
            Some((_, arg)) => format!("--set {arg}"),
            None => match find_key_line(&self.text, key) {
                Some(line) => format!("{}:{line}", self.origin),
                None => self.origin.clone(),
            },
        };
        ConfigError::Key {
            location,
            key: key.to_string(),
            message: message.trim_end().to_string(),
        }
    }
}

/// Lays `over` onto `base`: tables merge key by key, anything else replaces.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn parse_override_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds the 1-based line that defines `key` (`section.field`), following
/// `[section]` headers; best effort, for error messages only.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let (section, field) = match key.rsplit_once('.') {
        Some((s, f)) => (s, f),
        None => ("", key),
    };
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let header = header.trim().trim_matches(|c| c == '[' || c == ']').trim();
            current = header.to_string();
            if section.is_empty() && header == field {
                return Some(i + 1);
            }
            continue;
        }
        let Some((lhs, _)) = line.split_once('=') else {
            continue;
        };
        let lhs = lhs.trim().trim_matches('"');
        let full = if current.is_empty() {
            lhs.to_string()
        } else {
            format!("{current}.{lhs}")
        };
        if full == key || (current == section && lhs == field) {
            return Some(i + 1);
        }
    }
    None
}

/// `[federate]`: who takes part, for how long, and how often to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CourseSection {
    /// The course name; also the NATS subject prefix and the run folder name.
    pub name: String,
    /// Number of training rounds.
    pub rounds: u64,
    /// Number of clients expected to join.
    pub clients: u32,
    /// Clients sampled per round (all when unset).
    pub sample_clients: Option<u32>,
    /// Evaluate every this many rounds (and always after the last).
    pub eval_every: u64,
    /// Evaluate the initial global parameters before the first round.
    pub eval_before_training: bool,
    /// Seed of client sampling (and of anything else random in the course).
    pub seed: u64,
    /// The scenario, as in FS-LLM's Table 2: `fed` (federated), `global`
    /// (one client holding all data, the centralized reference) or `local`
    /// (each client trains alone). The runner builds the course accordingly;
    /// the kernel's course itself is always federated.
    pub mode: Mode,
    /// Save the global parameters every this many rounds (0: only at the end);
    /// the runner decides where and how.
    pub save_every: u64,
    /// Seconds the server waits for the clients of one step (joining, a
    /// training round, an evaluation). When they pass, clients that have not
    /// answered are dropped from the step — they take part again once they
    /// rejoin — and the step completes if at least `min_clients` answered.
    /// Unset: wait for every client, however long (the in-process default).
    pub round_timeout_s: Option<f64>,
    /// Answers a step needs to complete after `round_timeout_s` (default 1).
    pub min_clients: u32,
    /// Seconds between a client's `join_in` attempts until the server accepts it.
    pub join_retry_s: f64,
    /// What the server does when a client reports that its local training or
    /// evaluation failed (a diverged loss, NaN or infinite parameters, a
    /// trainer error): `fail` ends the course naming the round, the client
    /// and the reason; `skip-client` completes the step without that client.
    pub on_divergence: OnDivergence,
    /// Keep the global parameters of the evaluation with the lowest loss of
    /// this split (`val_loss`, `test_loss`, …; FS-LLM's
    /// `best_res_update_round_wise_key`): the runner saves them as `adapter-best/`.
    pub keep_best: Option<String>,
    /// End the course once this many evaluations in a row have not
    /// improved on `keep_best`'s best (0: never).
    pub early_stop_patience: u64,
}

/// See [`CourseSection::on_divergence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnDivergence {
    /// End the course with the client's reason.
    #[default]
    Fail,
    /// Go on without the client for that step.
    SkipClient,
}

/// See [`CourseSection::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Federated training with aggregation.
    #[default]
    Fed,
    /// All data on one client.
    Global,
    /// Every client alone, no aggregation.
    Local,
}

impl Default for CourseSection {
    fn default() -> Self {
        Self {
            name: "course".into(),
            rounds: 5,
            clients: 3,
            sample_clients: None,
            eval_every: 1,
            eval_before_training: true,
            seed: 42,
            mode: Mode::Fed,
            save_every: 0,
            round_timeout_s: None,
            min_clients: 1,
            join_retry_s: 2.0,
            on_divergence: OnDivergence::Fail,
            keep_best: None,
            early_stop_patience: 0,
        }
    }
}

/// `[wire]`: how messages are encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireSection {
    /// Payload quantization: `none`, `f16`, `bf16` or `int8`.
    pub quantization: Quantization,
    /// Body compression: `none`, `deflate` or `gzip`.
    pub compression: Compression,
    /// DEFLATE effort, 0–9 (1: fast, nearly as small as 9 on float payloads).
    pub compression_level: u32,
    /// Largest message accepted, in MiB (after decompression).
    pub max_message_mib: u64,
}

impl Default for WireSection {
    fn default() -> Self {
        Self {
            quantization: Quantization::None,
            compression: Compression::None,
            compression_level: 1,
            max_message_mib: 1024,
        }
    }
}

impl WireSection {
    /// How outgoing messages are encoded.
    pub fn encode_options(&self) -> EncodeOptions {
        EncodeOptions {
            quantization: self.quantization,
            compression: self.compression,
            level: self.compression_level,
        }
    }

    /// The decode bounds this section sets.
    pub fn limits(&self) -> DecodeLimits {
        let bytes =
            usize::try_from(self.max_message_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        DecodeLimits {
            max_frame_bytes: bytes,
            max_body_bytes: bytes,
        }
    }
}

/// `[broker]`: how a course's parties reach each other. The kernel only
/// describes the choice; the in-process bus is the kernel's, the NATS
/// transport lives in `fedtune-broker`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// `in-process` (one process, the embedded bus) or `nats` (a server
    /// process and one process per client, over a NATS broker).
    pub transport: TransportKind,
    /// The broker's URL for `nats`; unset: start a local nats-server with a
    /// user per party for the run.
    pub url: Option<String>,
    /// A directory of credentials files (`server.json`, `client-N.json`) for `url`.
    pub credentials: Option<PathBuf>,
    /// A party whose incoming messages from one sender were rejected this
    /// many times stops reading that sender (0: never).
    pub max_bad_frames: u64,
    /// MiB of partly received frames a party keeps for all senders together;
    /// past it the least recently fed frames are dropped.
    pub max_inflight_mib: u64,
    /// A PEM file of the certificate authority that signed the broker's TLS
    /// certificate: when set, every party connects over TLS and trusts only
    /// a broker whose certificate it signed.
    pub tls_ca: Option<PathBuf>,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            transport: TransportKind::InProcess,
            url: None,
            credentials: None,
            max_bad_frames: 1000,
            max_inflight_mib: 2048,
            tls_ca: None,
        }
    }
}

/// See [`BrokerSection::transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// The in-process bus.
    InProcess,
    /// NATS.
    Nats,
}

/// The kernel's part of a configuration: `[federate]`, `[wire]`, `[aggregator]`, `[scripting]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CourseConfig {
    /// The course section.
    pub course: CourseSection,
    /// The wire section.
    pub wire: WireSection,
    /// `[aggregator]`: native FedAvg, or a script and its hyperparameters.
    pub aggregator: crate::script::AggregatorSection,
    /// `[scripting]`: sandbox limits and the script error policy.
    pub scripting: crate::script::ScriptingSection,
    /// `[privacy]`: differential privacy of the clients' updates.
    pub privacy: crate::privacy::PrivacySection,
}

impl CourseConfig {
    /// The sections this type reads.
    pub const SECTIONS: [&'static str; 5] =
        ["federate", "wire", "aggregator", "scripting", "privacy"];

    /// Reads and validates the kernel's sections of `doc`.
    pub fn from_doc(doc: &ConfigDoc) -> Result<Self, ConfigError> {
        let cfg = Self {
            course: doc.section("federate")?,
            wire: doc.section("wire")?,
            aggregator: doc.section("aggregator")?,
            scripting: doc.section("scripting")?,
            privacy: doc.section("privacy")?,
        };
        cfg.validate(doc)?;
        Ok(cfg)
    }

    /// Parses a complete kernel-only configuration from text.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let doc = ConfigDoc::parse(text, origin)?;
        doc.check_sections(&Self::SECTIONS)?;
        Self::from_doc(&doc)
    }

    /// How many clients train each round.
    pub fn clients_per_round(&self) -> u32 {
        self.course.sample_clients.unwrap_or(self.course.clients)
    }

    fn validate(&self, doc: &ConfigDoc) -> Result<(), ConfigError> {
        self.scripting.validate().map_err(|e| doc.locate(e))?;
        let c = &self.course;
        let err = |key: &str, message: String| Err(doc.key_error(key, message));
        if c.name.is_empty()
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            return err(
                "federate.name",
                format!("`{}` must be non-empty and use only letters, digits, `-` and `_` (it names NATS subjects and folders)", c.name),
            );
        }
        if c.rounds == 0 {
            return err("federate.rounds", "must be at least 1".into());
        }
        if c.clients == 0 {
            return err("federate.clients", "must be at least 1".into());
        }
        if let Some(k) = c.sample_clients {
            if k == 0 || k > c.clients {
                return err(
                    "federate.sample_clients",
                    format!(
                        "must be between 1 and federate.clients ({}), got {k}",
                        c.clients
                    ),
                );
            }
        }
        if let Some(t) = c.round_timeout_s {
            if !(t > 0.0 && t.is_finite()) {
                return err(
                    "federate.round_timeout_s",
                    format!("must be a positive number of seconds, got {t}"),
                );
            }
        }
        if let Some(key) = &c.keep_best {
            if let Err(e) = crate::course::best::BestTracker::new(key, c.early_stop_patience) {
                return err("federate.keep_best", e.to_string());
            }
        } else if c.early_stop_patience > 0 {
            return err(
                "federate.early_stop_patience",
                "needs federate.keep_best, the loss it watches (e.g. \"val_loss\")".to_string(),
            );
        }
        if c.min_clients == 0 || c.min_clients > c.clients {
            return err(
                "federate.min_clients",
                format!(
                    "must be between 1 and federate.clients ({}), got {}",
                    c.clients, c.min_clients
                ),
            );
        }
        if !(c.join_retry_s > 0.0 && c.join_retry_s.is_finite()) {
            return err(
                "federate.join_retry_s",
                format!(
                    "must be a positive number of seconds, got {}",
                    c.join_retry_s
                ),
            );
        }
        if c.eval_every == 0 {
            return err("federate.eval_every", "must be at least 1".into());
        }
        if self.wire.compression_level > 9 {
            return err(
                "wire.compression_level",
                format!(
                    "must be between 0 and 9, got {}",
                    self.wire.compression_level
                ),
            );
        }
        if self.wire.max_message_mib == 0 {
            return err("wire.max_message_mib", "must be at least 1".into());
        }
        self.privacy
            .validate(
                c.rounds,
                c.clients,
                self.clients_per_round(),
                self.aggregator.script.as_deref(),
            )
            .map_err(|e| doc.locate(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extends_lays_a_variant_over_its_base() {
        let dir = std::env::temp_dir().join(format!("fedtune-extends-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("base.toml"),
            "[federate]\nname = \"base\"\nrounds = 7\nclients = 4\n[wire]\nquantization = \"int8\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("variant.toml"),
            "extends = \"base.toml\"\n[federate]\nrounds = 2\n[aggregator]\nscript = \"fedadam\"\n",
        )
        .unwrap();
        let doc = ConfigDoc::load(&dir.join("variant.toml")).unwrap();
        doc.check_sections(&CourseConfig::SECTIONS).unwrap();
        let cfg = CourseConfig::from_doc(&doc).unwrap();
        assert_eq!(
            (
                cfg.course.name.as_str(),
                cfg.course.rounds,
                cfg.course.clients
            ),
            ("base", 2, 4)
        );
        assert_eq!(cfg.wire.quantization, crate::Quantization::Int8);
        assert_eq!(cfg.aggregator.script.as_deref(), Some("fedadam"));
        std::fs::write(dir.join("loop.toml"), "extends = \"loop.toml\"\n").unwrap();
        let err = ConfigDoc::load(&dir.join("loop.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("extends") && err.contains("cycle"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const SAMPLE: &str = r#"
# a course
[federate]
name = "demo"
rounds = 7
clients = 4
sample_clients = 2

[wire]
quantization = "int8"
compression = "gzip"
"#;

    #[test]
    fn reads_sections_and_fills_defaults() {
        let cfg = CourseConfig::from_toml(SAMPLE, "demo.toml").unwrap();
        assert_eq!(cfg.course.rounds, 7);
        assert_eq!(cfg.course.clients, 4);
        assert_eq!(cfg.clients_per_round(), 2);
        assert_eq!(cfg.course.eval_every, 1);
        assert_eq!(cfg.wire.quantization, Quantization::Int8);
        assert_eq!(cfg.wire.compression, Compression::Gzip);
        assert_eq!(
            CourseConfig::from_toml("", "empty.toml").unwrap(),
            CourseConfig::default()
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_path() {
        let text = SAMPLE.replace("rounds = 7", "roundz = 7");
        let err = CourseConfig::from_toml(&text, "demo.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("demo.toml:5: `federate.roundz`: unknown field `roundz`"),
            "{err}"
        );
        assert!(err.contains("`rounds`"), "lists the expected keys: {err}");
    }

    #[test]
    fn mistyped_value_names_the_key() {
        let text = SAMPLE.replace("clients = 4", "clients = \"four\"");
        let err = CourseConfig::from_toml(&text, "demo.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("demo.toml:6: `federate.clients`: invalid type: string"),
            "{err}"
        );
        let text = SAMPLE.replace("\"int8\"", "\"int4\"");
        let err = CourseConfig::from_toml(&text, "demo.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("demo.toml:10: `wire.quantization`: unknown variant `int4`"),
            "{err}"
        );
        assert!(!err.contains("\n"), "one line: {err}");
    }

    #[test]
    fn unknown_section_is_rejected() {
        let err = CourseConfig::from_toml("[cuorse]\nrounds = 1\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "x.toml:1: `cuorse`: unknown section, expected one of `federate`, `wire`, `aggregator`, `scripting`, `privacy`"
        );
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = CourseConfig::from_toml("[federate\n", "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad.toml: invalid TOML"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let text = SAMPLE.replace("sample_clients = 2", "sample_clients = 9");
        let err = CourseConfig::from_toml(&text, "demo.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "demo.toml:7: `federate.sample_clients`: must be between 1 and federate.clients (4), got 9"
        );
        let err = CourseConfig::from_toml("[federate]\nname = \"a b\"\n", "n.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("n.toml:2: `federate.name`"), "{err}");
    }

    #[test]
    fn overrides_replace_values_and_are_blamed_for_their_errors() {
        let mut doc = ConfigDoc::parse(SAMPLE, "demo.toml").unwrap();
        doc.apply_override("federate.rounds=11").unwrap();
        doc.apply_override("wire.compression=deflate").unwrap();
        doc.apply_override("federate.name = \"other\"").unwrap();
        let cfg = CourseConfig::from_doc(&doc).unwrap();
        assert_eq!(cfg.course.rounds, 11);
        assert_eq!(cfg.course.name, "other");
        assert_eq!(cfg.wire.compression, Compression::Deflate);

        doc.apply_override("federate.rounds=eleven").unwrap();
        let err = CourseConfig::from_doc(&doc).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "--set federate.rounds=eleven: `federate.rounds`: invalid type: string"
            ),
            "{err}"
        );

        let mut doc = ConfigDoc::parse(SAMPLE, "demo.toml").unwrap();
        doc.apply_override("federate.seedz=3").unwrap();
        let err = CourseConfig::from_doc(&doc).unwrap_err().to_string();
        assert!(
            err.starts_with("--set federate.seedz=3: `federate.seedz`: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn malformed_overrides_are_explained() {
        let mut doc = ConfigDoc::parse(SAMPLE, "demo.toml").unwrap();
        for bad in ["rounds", "rounds=3", "federate.=3", "federate.rounds.x=1"] {
            assert!(doc.apply_override(bad).is_err(), "{bad} should fail");
        }
    }
}
