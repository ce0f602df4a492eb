//! The server's strategy as a Rhai script.
//!
//! A strategy script defines `aggregate_fit(global, results, round)` (or,
//! the older name, `aggregate(global, updates, round)`), which returns the
//! next global `ParamSet`, and any of these hooks; each one it leaves out
//! keeps the native default (see [`crate::aggregate`]):
//!
//! | function | returns |
//! |---|---|
//! | `on_round_start(round)` | nothing (update `this`) |
//! | `sample(joined, round)` | the array of client ids that train this round |
//! | `configure_fit(global, clients, round)` | an array with, per client, a `fit_ins(client, config, params)` (or just its id: the global parameters) |
//! | `aggregate_fit(global, results, round)` | the next global `ParamSet`; each result is an `Update` (`.client`, `.params`, `.n_samples`, `.local_steps`, `.train_loss`, `.metrics`, `.config`, `.extra`) |
//! | `on_round_end(global, round)` | a map of numbers for the round's record, or nothing |
//! | `aggregate_evaluate(results, round)` | a map of numbers recorded as the round's `strategy` evaluation; each result is `#{client, split, loss, samples, metrics}` |
//!
//! Inside, `this` is a map that lives for the whole course (and is saved in
//! checkpoints) — a server optimizer keeps its moments there, SCAFFOLD its
//! control variate — and `this.hp` holds the hyperparameters of
//! `[aggregator.params]`:
//!
//! ```rhai
//! // FedAvgM: server momentum on the averaged update.
//! fn aggregate(global, updates, round) {
//!     let delta = weighted_mean(updates) - global;
//!     this.m = if this.m == () { delta } else { this.m * (this.hp.momentum ?? 0.9) + delta };
//!     global + this.m * (this.hp.server_lr ?? 1.0)
//! }
//! ```
//!
//! The script file is re-read at every round: an edit takes effect from the
//! next round. A result that does not match the global parameters' names
//! and shapes, or holds NaN or infinity, is an error like any other: the
//! course stops (or, with `scripting.on_script_error = "skip"`, that hook
//! falls back to its native default), and the script's state rolls back.

use std::path::{Path, PathBuf};

use rhai::{Array, Dynamic, Map};
use serde::{Deserialize, Serialize};

use super::{BadValue, OnScriptError, ScriptError, ScriptFile, ScriptHost};
use std::collections::BTreeMap;

use crate::aggregate::{
    fedavg_of, AggregateError, Aggregator, ClientEval, ClientUpdate, FitInstruction,
};
use crate::params::ParamSet;

/// The strategies shipped in `scripts/aggregators/`, compiled into the binary
/// so that a bare name works from any directory.
pub const BUILT_IN: [(&str, &str); 15] = [
    (
        "fedavg",
        include_str!("../../scripts/aggregators/fedavg.rhai"),
    ),
    (
        "fedavgm",
        include_str!("../../scripts/aggregators/fedavgm.rhai"),
    ),
    (
        "fedadam",
        include_str!("../../scripts/aggregators/fedadam.rhai"),
    ),
    (
        "fedyogi",
        include_str!("../../scripts/aggregators/fedyogi.rhai"),
    ),
    (
        "fedadagrad",
        include_str!("../../scripts/aggregators/fedadagrad.rhai"),
    ),
    (
        "median",
        include_str!("../../scripts/aggregators/median.rhai"),
    ),
    (
        "trimmed_mean",
        include_str!("../../scripts/aggregators/trimmed_mean.rhai"),
    ),
    (
        "fednova",
        include_str!("../../scripts/aggregators/fednova.rhai"),
    ),
    ("krum", include_str!("../../scripts/aggregators/krum.rhai")),
    (
        "bulyan",
        include_str!("../../scripts/aggregators/bulyan.rhai"),
    ),
    (
        "flexlora",
        include_str!("../../scripts/aggregators/flexlora.rhai"),
    ),
    (
        "hetlora",
        include_str!("../../scripts/aggregators/hetlora.rhai"),
    ),
    (
        "scaffold",
        include_str!("../../scripts/aggregators/scaffold.rhai"),
    ),
    (
        "flora",
        include_str!("../../scripts/aggregators/flora.rhai"),
    ),
    (
        "fedex_lora",
        include_str!("../../scripts/aggregators/fedex_lora.rhai"),
    ),
];

/// The shipped script a `script` setting names when no file is found: the
/// last path component without `.rhai` (`scripts/aggregators/fedadam.rhai`
/// and `fedadam` both name `fedadam`).
pub fn shipped_name(spec: &str) -> &str {
    let bare = spec.strip_suffix(".rhai").unwrap_or(spec);
    bare.rsplit('/').next().unwrap_or(bare)
}

/// `[aggregator]`: how the server combines updates (native FedAvg when no script is set).
pub type AggregatorSection = ScriptSection;

/// A config section that selects a script: `[aggregator]`, `[hooks]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptSection {
    /// A script path (`scripts/aggregators/fedadam.rhai`) or the name of a
    /// shipped one (`fedadam`). Unset: the native default.
    pub script: Option<String>,
    /// Hyperparameters, read by the script as `this.hp.NAME`.
    pub params: toml::Table,
}

impl ScriptSection {
    /// Finds the script: the path relative to `config_dir`, then to its
    /// parent, then as given (relative to the working directory), then a
    /// shipped script of that name in `built_in`. `Ok(None)` when no script is configured.
    pub fn resolve_in(
        &self,
        config_dir: Option<&Path>,
        built_in: &'static [(&'static str, &'static str)],
    ) -> Result<Option<ScriptSource>, ScriptNotFound> {
        let Some(spec) = &self.script else {
            return Ok(None);
        };
        // Relative to the config first, so a config's paths mean the same
        // file wherever fedtune runs (a course made by `fedtune init` uses its
        // own copies even when run from a checkout that ships the originals).
        let given = PathBuf::from(spec);
        let mut tried = Vec::new();
        if given.is_relative() {
            if let Some(dir) = config_dir {
                tried.push(dir.join(&given));
                if let Some(parent) = dir.parent() {
                    tried.push(parent.join(&given));
                }
            }
        }
        tried.push(given.clone());
        let mut seen = std::collections::HashSet::new();
        tried.retain(|p| seen.insert(p.clone()));
        if let Some(found) = tried.iter().find(|p| p.is_file()) {
            return Ok(Some(ScriptSource::File(found.clone())));
        }
        let bare = shipped_name(spec);
        if let Some((name, text)) = built_in.iter().find(|(n, _)| *n == bare) {
            return Ok(Some(ScriptSource::BuiltIn { name, text }));
        }
        Err(ScriptNotFound {
            spec: spec.clone(),
            tried,
            shipped: built_in.iter().map(|(n, _)| n.to_string()).collect(),
        })
    }

    /// [`Self::resolve_in`] among the shipped aggregators.
    pub fn resolve(
        &self,
        config_dir: Option<&Path>,
    ) -> Result<Option<ScriptSource>, ScriptNotFound> {
        self.resolve_in(config_dir, &BUILT_IN)
    }

    /// The hyperparameters as a script map.
    pub fn hp(&self) -> Map {
        self.params
            .iter()
            .map(|(k, v)| (k.as_str().into(), toml_to_dynamic(v)))
            .collect()
    }
}

/// A script named in a config that is neither a file nor a shipped script.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "no script file `{spec}` (looked at {}) and no shipped script of that name (shipped: {})",
    .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    .shipped.join(", ")
)]
pub struct ScriptNotFound {
    /// What the config said.
    pub spec: String,
    /// The paths looked at.
    pub tried: Vec<PathBuf>,
    /// The shipped scripts' names.
    pub shipped: Vec<String>,
}

/// A script named in a config that cannot be used: not found, or not a valid script.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScriptLoadError {
    /// No such file and no shipped script of that name.
    #[error(transparent)]
    NotFound(#[from] ScriptNotFound),
    /// The script does not compile or lacks a function it must define.
    #[error(transparent)]
    Script(#[from] ScriptError),
}

/// Where a script comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ScriptSource {
    /// A file on disk, reloaded when it changes.
    File(PathBuf),
    /// A copy compiled into the binary.
    BuiltIn {
        /// Its name.
        name: &'static str,
        /// Its text.
        text: &'static str,
    },
}

/// An [`Aggregator`] whose logic is a Rhai script.
pub struct ScriptAggregator {
    host: ScriptHost,
    script: ScriptFile,
    state: Dynamic,
    hp: Map,
    name: String,
    fallbacks: u64,
}

impl std::fmt::Debug for ScriptAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptAggregator")
            .field("script", &self.script.origin())
            .field("fallbacks", &self.fallbacks)
            .finish_non_exhaustive()
    }
}

impl ScriptAggregator {
    /// Loads and checks the script (it must define `aggregate_fit` or
    /// `aggregate`, with three parameters).
    pub fn new(
        host: ScriptHost,
        source: &ScriptSource,
        params: &toml::Table,
    ) -> Result<Self, ScriptError> {
        let script = ScriptFile::from_source(&host, source)?;
        let name = script.name().to_string();
        if !script.has_fn("aggregate_fit", 3) {
            script.require_fn("aggregate", 3).map_err(|mut e| {
                e.message = e.message.replace(
                    "no function `aggregate`",
                    "no function `aggregate_fit` (or `aggregate`)",
                );
                e
            })?;
        }
        let hp = ScriptSection {
            script: None,
            params: params.clone(),
        }
        .hp();
        Ok(Self {
            host,
            script,
            state: Dynamic::from_map(Map::new()),
            hp,
            name,
            fallbacks: 0,
        })
    }

    /// The script's file (or built-in name), as errors name it.
    pub fn origin(&self) -> &str {
        self.script.origin()
    }

    /// Rounds that fell back to native FedAvg after a script error (policy `skip`).
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// Calls hook `name` (if the script defines it with `args`' arity) and
    /// reads its result with `read`; a failure of either rolls `this` back
    /// and, under the `skip` policy, gives `fallback()` instead. `Ok(None)`:
    /// the script does not define the hook.
    fn hook<T>(
        &mut self,
        (name, round): (&str, u64),
        args: impl rhai::FuncArgs,
        arity: usize,
        read: impl FnOnce(Dynamic) -> Result<T, BadValue>,
        fallback: impl FnOnce() -> Result<T, AggregateError>,
    ) -> Result<Option<T>, AggregateError> {
        if !self.script.has_fn(name, arity) {
            return Ok(None);
        }
        let doing = format!("{name}, round {round}");
        if let Some(map) = self.state.write_lock::<Map>().as_deref_mut() {
            map.insert("hp".into(), Dynamic::from_map(self.hp.clone()));
        }
        let before = self.state.clone();
        let result = self
            .host
            .call(&self.script, name, &mut self.state, args, &doing)
            .and_then(|out| {
                read(out).map_err(|m| ScriptError::unplaced(self.script.origin(), m, &doing))
            });
        match result {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                self.state = before;
                match self.host.policy() {
                    OnScriptError::Fail => Err(AggregateError::Other(e.to_string())),
                    OnScriptError::Skip => {
                        self.fallbacks += 1;
                        tracing::warn!("{e}; the native default stands in (scripting.on_script_error = \"skip\")");
                        fallback().map(Some)
                    }
                }
            }
        }
    }

    fn refresh(&mut self, round: u64) {
        match self.script.refresh(&self.host) {
            Ok(true) => tracing::info!(
                script = self.script.origin(),
                round,
                "script changed on disk: the new version runs from this round on"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!("{e}; the previous version of the script stays in force"),
        }
    }
}

/// A script's map of numbers (`on_round_end`, `aggregate_evaluate`); nothing is an empty map.
fn read_numbers(out: Dynamic, hook: &str) -> Result<BTreeMap<String, f64>, BadValue> {
    if out.is_unit() {
        return Ok(BTreeMap::new());
    }
    let type_name = out.type_name().to_string();
    let map = out.try_cast::<Map>().ok_or_else(|| {
        BadValue(format!(
            "`{hook}` must return a map of numbers, it returned {type_name}"
        ))
    })?;
    map.into_iter()
        .map(|(k, v)| {
            let x = v
                .as_float()
                .ok()
                .or_else(|| v.as_int().ok().map(|i| i as f64))
                .filter(|x| x.is_finite())
                .ok_or_else(|| BadValue(format!("`{hook}`: `{k}` is not a finite number")))?;
            Ok((k.to_string(), x))
        })
        .collect()
}

/// What `configure_fit` returned: an instruction or a bare client id per client.
fn read_instructions(out: Dynamic) -> Result<Vec<FitInstruction>, BadValue> {
    let type_name = out.type_name().to_string();
    let list = out.try_cast::<Array>().ok_or_else(|| {
        BadValue(format!("`configure_fit` must return an array of fit_ins(…) or client ids, it returned {type_name}"))
    })?;
    list.into_iter()
        .enumerate()
        .map(|(i, item)| {
            if let Some(ins) = item.clone().try_cast::<FitInstruction>() {
                return Ok(ins);
            }
            match item.as_int().ok().and_then(|c| u32::try_from(c).ok()) {
                Some(c) => Ok(FitInstruction::plain(c)),
                None => Err(BadValue(format!(
                    "`configure_fit`: element {i} is a {}, neither fit_ins(…) nor a client id",
                    item.type_name()
                ))),
            }
        })
        .collect()
}

fn client_ids(clients: &[u32]) -> Array {
    clients
        .iter()
        .map(|&c| Dynamic::from(i64::from(c)))
        .collect()
}

impl Aggregator for ScriptAggregator {
    fn name(&self) -> &str {
        &self.name
    }

    fn aggregate(
        &mut self,
        global: &ParamSet,
        updates: &[ClientUpdate],
        round: u64,
    ) -> Result<ParamSet, AggregateError> {
        if updates.is_empty() {
            return Err(AggregateError::Empty);
        }
        self.refresh(round);
        // Client-id order, as the native aggregators use; only references are sorted.
        let mut ordered: Vec<&ClientUpdate> = updates.iter().collect();
        ordered.sort_by_key(|u| u.client);
        let name = if self.script.has_fn("aggregate_fit", 3) {
            "aggregate_fit"
        } else {
            "aggregate"
        };
        let list: Array = ordered.iter().map(|&u| Dynamic::from(u.clone())).collect();
        let read = |out: Dynamic| {
            let type_name = out.type_name().to_string();
            let next = out.try_cast::<ParamSet>().ok_or_else(|| {
                format!("`{name}` must return a ParamSet, it returned {type_name}")
            })?;
            global
                .check_compatible(&next)
                .and_then(|()| next.check_finite())
                .map_err(|e| format!("`{name}` returned unusable parameters: {e}"))?;
            Ok(next)
        };
        let args = (global.clone(), list, round as i64);
        let next = self.hook((name, round), args, 3, read, || fedavg_of(&ordered))?;
        Ok(next.expect("the script defines its aggregation"))
    }

    fn on_round_start(&mut self, round: u64) -> Result<(), AggregateError> {
        self.refresh(round);
        self.hook(
            ("on_round_start", round),
            (round as i64,),
            1,
            |_| Ok(()),
            || Ok(()),
        )?;
        Ok(())
    }

    fn sample(
        &mut self,
        round: u64,
        joined: &[u32],
        default: Vec<u32>,
    ) -> Result<Vec<u32>, AggregateError> {
        let read = |out: Dynamic| {
            let type_name = out.type_name().to_string();
            let list = out.try_cast::<Array>().ok_or_else(|| {
                BadValue(format!(
                    "`sample` must return an array of client ids, it returned {type_name}"
                ))
            })?;
            list.into_iter()
                .map(|c| {
                    c.as_int()
                        .ok()
                        .and_then(|c| u32::try_from(c).ok())
                        .filter(|c| joined.contains(c))
                        .ok_or_else(|| {
                            BadValue(format!(
                                "`sample` returned {c}, which is not a joined client ({joined:?})"
                            ))
                        })
                })
                .collect()
        };
        let fallback = default.clone();
        let args = (client_ids(joined), round as i64);
        Ok(self
            .hook(("sample", round), args, 2, read, || Ok(fallback))?
            .unwrap_or(default))
    }

    fn configure_fit(
        &mut self,
        global: &ParamSet,
        clients: &[u32],
        round: u64,
    ) -> Result<Vec<FitInstruction>, AggregateError> {
        let plain = || {
            clients
                .iter()
                .map(|&c| FitInstruction::plain(c))
                .collect::<Vec<_>>()
        };
        let _checks = super::api::FitRound::start(clients.to_vec(), global.clone());
        let args = (global.clone(), client_ids(clients), round as i64);
        Ok(self
            .hook(("configure_fit", round), args, 3, read_instructions, || {
                Ok(plain())
            })?
            .unwrap_or_else(plain))
    }

    fn on_round_end(
        &mut self,
        global: &ParamSet,
        round: u64,
    ) -> Result<BTreeMap<String, f64>, AggregateError> {
        let args = (global.clone(), round as i64);
        let read = |out| read_numbers(out, "on_round_end");
        Ok(self
            .hook(("on_round_end", round), args, 2, read, || {
                Ok(BTreeMap::new())
            })?
            .unwrap_or_default())
    }

    fn aggregate_evaluate(
        &mut self,
        results: &[ClientEval],
        round: u64,
    ) -> Result<BTreeMap<String, f64>, AggregateError> {
        let list: Array = results
            .iter()
            .map(|r| {
                let mut m = Map::new();
                m.insert("client".into(), Dynamic::from(i64::from(r.client)));
                m.insert("split".into(), Dynamic::from(r.split.clone()));
                m.insert("loss".into(), Dynamic::from(r.loss));
                m.insert("samples".into(), Dynamic::from(r.samples as i64));
                let metrics: Map = r
                    .metrics
                    .iter()
                    .map(|(k, v)| (k.as_str().into(), Dynamic::from(*v)))
                    .collect();
                m.insert("metrics".into(), Dynamic::from_map(metrics));
                Dynamic::from_map(m)
            })
            .collect();
        let read = |out| read_numbers(out, "aggregate_evaluate");
        Ok(self
            .hook(
                ("aggregate_evaluate", round),
                (list, round as i64),
                2,
                read,
                || Ok(BTreeMap::new()),
            )?
            .unwrap_or_default())
    }

    fn save_state(&self) -> Result<Option<Vec<u8>>, AggregateError> {
        super::state::save_state(&self.state)
            .map(Some)
            .map_err(|e| AggregateError::Other(format!("{}: {e}", self.script.origin())))
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), AggregateError> {
        self.state = super::state::load_state(bytes)
            .map_err(|e| AggregateError::Other(format!("{}: {e}", self.script.origin())))?;
        Ok(())
    }
}

/// A TOML value as a script value (integers stay integers, tables become maps).
pub fn toml_to_dynamic(v: &toml::Value) -> Dynamic {
    match v {
        toml::Value::String(s) => Dynamic::from(s.clone()),
        toml::Value::Integer(i) => Dynamic::from(*i),
        toml::Value::Float(f) => Dynamic::from(*f),
        toml::Value::Boolean(b) => Dynamic::from(*b),
        toml::Value::Datetime(d) => Dynamic::from(d.to_string()),
        toml::Value::Array(a) => Dynamic::from_array(a.iter().map(toml_to_dynamic).collect()),
        toml::Value::Table(t) => Dynamic::from_map(
            t.iter()
                .map(|(k, v)| (k.as_str().into(), toml_to_dynamic(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::ScriptingSection;
    use rand::{Rng, SeedableRng};

    fn update(client: u32, n: u64, w: &[f32]) -> ClientUpdate {
        let mut params = ParamSet::new();
        params.insert("w", vec![w.len()], w.to_vec()).unwrap();
        ClientUpdate::new(client, n, params)
    }

    fn built_in(name: &str, hp: &str) -> ScriptAggregator {
        let source = AggregatorSection {
            script: Some(name.into()),
            params: hp.parse().unwrap(),
        }
        .resolve(None)
        .unwrap()
        .unwrap();
        ScriptAggregator::new(
            ScriptHost::new(&ScriptingSection::default()),
            &source,
            &hp.parse().unwrap(),
        )
        .unwrap()
    }

    fn from_text(text: &str, policy: OnScriptError) -> ScriptAggregator {
        let host = ScriptHost::new(&ScriptingSection {
            on_script_error: policy,
            ..Default::default()
        });
        let leaked: &'static str = Box::leak(text.to_string().into_boxed_str());
        let source = ScriptSource::BuiltIn {
            name: "test",
            text: leaked,
        };
        ScriptAggregator::new(host, &source, &toml::Table::new()).unwrap()
    }

    fn w(p: &ParamSet) -> Vec<f32> {
        p.get("w").unwrap().data().to_vec()
    }

    #[test]
    fn fedavg_script_equals_native_fedavg_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut script = built_in("fedavg", "");
        let mut global = update(0, 1, &[0.0; 64]).params;
        for round in 1..=5 {
            // Random values and weights, handed over in a scrambled order.
            let mut updates: Vec<ClientUpdate> = (1..=7)
                .map(|c| {
                    let w: Vec<f32> = (0..64).map(|_| rng.random_range(-3.0..3.0)).collect();
                    update(c, rng.random_range(1..1000), &w)
                })
                .collect();
            updates.reverse();
            let native = crate::aggregate::FedAvg
                .aggregate(&global, &updates, round)
                .unwrap();
            let scripted = script.aggregate(&global, &updates, round).unwrap();
            assert_eq!(scripted, native, "round {round}");
            global = native;
        }
    }

    #[test]
    fn fedadam_matches_a_hand_computed_two_round_example() {
        let mut agg = built_in("fedadam", "server_lr = 1.0\ntau = 0.1");
        let x0 = update(0, 1, &[0.0, 0.0]).params;
        // Round 1: weights 1 and 3 → mean (1, −2) = Δ₁.
        let r1 = [update(1, 1, &[4.0, -2.0]), update(2, 3, &[0.0, -2.0])];
        let x1 = agg.aggregate(&x0, &r1, 1).unwrap();
        // m₁ = 0.1·Δ₁ = (0.1, −0.2); v₁ = 0.99·0.01 + 0.01·Δ₁² = (0.0199, 0.0499);
        // x₁ = m₁ / (√v₁ + 0.1) = (0.414822, −0.618462).
        let expect1 = [0.414_821_8_f32, -0.618_461_55];
        for (a, b) in w(&x1).iter().zip(expect1) {
            assert!((a - b).abs() < 1e-5, "{:?}", w(&x1));
        }
        // Round 2: Δ₂ = (0.5, 0.5). m₂ = (0.14, −0.13); v₂ = (0.022201, 0.051901);
        // x₂ = x₁ + m₂ / (√v₂ + 0.1) = (0.977071, −1.015023).
        let x1w = w(&x1);
        let r2 = [
            update(1, 5, &[x1w[0] + 0.3, x1w[1] + 0.7]),
            update(2, 5, &[x1w[0] + 0.7, x1w[1] + 0.3]),
        ];
        let x2 = agg.aggregate(&x1, &r2, 2).unwrap();
        for (a, b) in w(&x2).iter().zip([0.977_070_8_f32, -1.015_023_2]) {
            assert!((a - b).abs() < 1e-5, "{:?}", w(&x2));
        }
    }

    /// An independent implementation of Reddi et al.'s server optimizers.
    fn reference(kind: &str, deltas: &[[f64; 2]]) -> [f64; 2] {
        let (lr, b1, b2, tau) = (0.05, 0.9, 0.99, 1e-3);
        let (mut x, mut m, mut v) = ([0.0; 2], [0.0; 2], [tau * tau; 2]);
        for d in deltas {
            for i in 0..2 {
                m[i] = b1 * m[i] + (1.0 - b1) * d[i];
                let d2 = d[i] * d[i];
                v[i] = match kind {
                    "fedadam" => b2 * v[i] + (1.0 - b2) * d2,
                    "fedyogi" => v[i] - (1.0 - b2) * d2 * (v[i] - d2).signum(),
                    _ => v[i] + d2,
                };
                x[i] += lr * m[i] / (v[i].sqrt() + tau);
            }
        }
        x
    }

    #[test]
    fn server_optimizers_follow_their_update_rules_over_rounds() {
        let deltas = [[0.3, -0.1], [0.2, 0.05], [-0.4, 0.2], [0.1, 0.1]];
        for kind in ["fedadam", "fedyogi", "fedadagrad"] {
            let mut agg = built_in(kind, "server_lr = 0.05");
            let mut x = update(0, 1, &[0.0, 0.0]).params;
            let mut applied = Vec::new();
            for (r, d) in deltas.iter().enumerate() {
                let xw = w(&x);
                let u = update(1, 1, &[xw[0] + d[0] as f32, xw[1] + d[1] as f32]);
                // Use the Δ the script actually sees (f32 rounding of x + d − x).
                let seen = [
                    f64::from(w(&u.params)[0] - xw[0]),
                    f64::from(w(&u.params)[1] - xw[1]),
                ];
                applied.push(seen);
                x = agg.aggregate(&x, &[u], r as u64 + 1).unwrap();
            }
            let want = reference(kind, &applied);
            for (a, b) in w(&x).iter().zip(want) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-4,
                    "{kind}: {:?} vs {want:?}",
                    w(&x)
                );
            }
        }
    }

    #[test]
    fn saved_state_resumes_a_server_optimizer_exactly() {
        let rounds: Vec<Vec<ClientUpdate>> = (1..=3)
            .map(|r| {
                let r = r as f32;
                vec![
                    update(1, 2, &[0.3 * r, -0.2]),
                    update(2, 5, &[-0.1, 0.4 * r]),
                ]
            })
            .collect();
        let x0 = update(0, 1, &[0.0, 0.0]).params;
        let hp = "server_lr = 0.1";
        let mut straight = built_in("fedadam", hp);
        let mut x = x0.clone();
        for (r, ups) in rounds.iter().enumerate() {
            x = straight.aggregate(&x, ups, r as u64 + 1).unwrap();
        }
        // Two rounds, a checkpoint, and a fresh aggregator for the third.
        let mut first = built_in("fedadam", hp);
        let mut y = x0;
        for (r, ups) in rounds[..2].iter().enumerate() {
            y = first.aggregate(&y, ups, r as u64 + 1).unwrap();
        }
        let saved = first.save_state().unwrap().unwrap();
        let mut resumed = built_in("fedadam", hp);
        resumed.load_state(&saved).unwrap();
        assert_eq!(resumed.aggregate(&y, &rounds[2], 3).unwrap(), x);
        // Without the state the third round differs (the moments restart).
        let mut fresh = built_in("fedadam", hp);
        assert_ne!(fresh.aggregate(&y, &rounds[2], 3).unwrap(), x);
    }

    #[test]
    fn fedavgm_with_zero_momentum_is_fedavg_and_accumulates_otherwise() {
        let x0 = update(0, 1, &[1.0, 1.0]).params;
        let ups = [update(1, 1, &[2.0, 0.0]), update(2, 1, &[4.0, 2.0])];
        let mut plain = built_in("fedavgm", "momentum = 0.0");
        assert_eq!(w(&plain.aggregate(&x0, &ups, 1).unwrap()), [3.0, 1.0]);
        // β = 0.5: round 1 m = Δ = (2, 0); round 2 from the same x0 and updates: m = 0.5·m + Δ = (3, 0).
        let mut mom = built_in("fedavgm", "momentum = 0.5");
        assert_eq!(w(&mom.aggregate(&x0, &ups, 1).unwrap()), [3.0, 1.0]);
        assert_eq!(w(&mom.aggregate(&x0, &ups, 2).unwrap()), [4.0, 1.0]);
    }

    #[test]
    fn the_readme_example_damps_disagreeing_updates() {
        let text = include_str!("../../scripts/aggregators/damped_momentum.rhai");
        let mut agg = from_text(text, OnScriptError::Fail);
        let x0 = update(0, 1, &[0.0, 0.0]).params;
        // Agreeing clients: no spread, the full step.
        let same = [update(1, 1, &[1.0, 1.0]), update(2, 1, &[1.0, 1.0])];
        assert_eq!(w(&agg.aggregate(&x0, &same, 1).unwrap()), [1.0, 1.0]);
        // Disagreeing clients around the same mean (1, 1): spread ‖(1,−1)‖ each, ‖Δ‖ = √2,
        // so damp = 1/(1 + √2/√2) = 0.5; momentum m = 0.9·(1,1) + (1,1) = (1.9, 1.9).
        let apart = [update(1, 1, &[2.0, 0.0]), update(2, 1, &[0.0, 2.0])];
        let x2 = w(&agg.aggregate(&x0, &apart, 2).unwrap());
        assert!(
            (x2[0] - 0.95).abs() < 1e-5 && (x2[1] - 0.95).abs() < 1e-5,
            "{x2:?}"
        );
    }

    #[test]
    fn robust_scripts_call_the_native_rules() {
        let x0 = update(0, 1, &[0.0]).params;
        let ups: Vec<_> = [1.0, 2.0, 3.0, 4.0, 1000.0]
            .iter()
            .enumerate()
            .map(|(i, &v)| update(i as u32 + 1, 1, &[v]))
            .collect();
        assert_eq!(
            w(&built_in("median", "").aggregate(&x0, &ups, 1).unwrap()),
            [3.0]
        );
        let tm = built_in("trimmed_mean", "beta = 0.2")
            .aggregate(&x0, &ups, 1)
            .unwrap();
        assert_eq!(w(&tm), [3.0]);
    }

    #[test]
    fn script_failures_stop_or_fall_back_and_leave_state_alone() {
        let text = "fn aggregate(global, updates, round) {\n    this.calls = (this.calls ?? 0) + 1;\n    if round == 2 { throw \"bad round\"; }\n    weighted_mean(updates)\n}\n";
        let x0 = update(0, 1, &[0.0]).params;
        let ups = [update(1, 1, &[2.0])];
        let mut strict = from_text(text, OnScriptError::Fail);
        strict.aggregate(&x0, &ups, 1).unwrap();
        let err = strict.aggregate(&x0, &ups, 2).unwrap_err().to_string();
        assert!(
            err.starts_with("<built-in test>:3:") && err.contains("bad round"),
            "{err}"
        );
        assert!(err.contains("aggregate, round 2"), "{err}");
        let calls = |a: &ScriptAggregator| {
            a.state.read_lock::<Map>().unwrap()["calls"]
                .as_int()
                .unwrap()
        };
        assert_eq!(
            calls(&strict),
            1,
            "the failed call's change to `this` rolled back"
        );

        let mut lenient = from_text(text, OnScriptError::Skip);
        lenient.aggregate(&x0, &ups, 1).unwrap();
        assert_eq!(w(&lenient.aggregate(&x0, &ups, 2).unwrap()), [2.0]);
        assert_eq!(lenient.fallbacks(), 1);
        lenient.aggregate(&x0, &ups, 3).unwrap();
        assert_eq!(calls(&lenient), 2);
    }

    #[test]
    fn unusable_results_are_errors() {
        let x0 = update(0, 1, &[0.0]).params;
        let ups = [update(1, 1, &[2.0])];
        for (body, says) in [
            ("42", "returned i64"),
            ("global / 0.0", "non-finite"),
            ("let p = global; p", ""),
        ] {
            let text = format!("fn aggregate(global, updates, round) {{ {body} }}");
            let result = from_text(&text, OnScriptError::Fail).aggregate(&x0, &ups, 1);
            if says.is_empty() {
                assert!(result.is_ok());
            } else {
                let err = result.unwrap_err().to_string();
                assert!(err.contains(says), "{body}: {err}");
            }
        }
        let host = ScriptHost::new(&ScriptingSection::default());
        let source = ScriptSource::BuiltIn {
            name: "x",
            text: "fn aggregate(a, b) { a }",
        };
        let err = ScriptAggregator::new(host, &source, &toml::Table::new()).unwrap_err();
        assert!(
            err.message
                .contains("no function `aggregate_fit` (or `aggregate`) with 3"),
            "{err}"
        );
    }

    #[test]
    fn scripts_resolve_by_path_or_shipped_name() {
        let section = |s: &str| AggregatorSection {
            script: Some(s.into()),
            params: toml::Table::new(),
        };
        assert!(matches!(
            section("fedyogi").resolve(None),
            Ok(Some(ScriptSource::BuiltIn {
                name: "fedyogi",
                ..
            }))
        ));
        let err = section("fedmagic").resolve(None).unwrap_err().to_string();
        assert!(err.contains("fedmagic") && err.contains("fedadam"), "{err}");
        assert_eq!(AggregatorSection::default().resolve(None), Ok(None));
        let dir = std::env::temp_dir().join(format!("fedtune-agg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("scripts")).unwrap();
        std::fs::write(dir.join("scripts/mine.rhai"), "fn aggregate(g, u, r) { g }").unwrap();
        let found = section("scripts/mine.rhai")
            .resolve(Some(&dir.join("configs")))
            .unwrap();
        assert_eq!(
            found,
            Some(ScriptSource::File(dir.join("scripts/mine.rhai")))
        );
        // A copy beside the config wins over the same path from the working
        // directory (tests run in kernel/, which has scripts/aggregators/).
        std::fs::create_dir_all(dir.join("scripts/aggregators")).unwrap();
        std::fs::write(
            dir.join("scripts/aggregators/fedavg.rhai"),
            "fn aggregate(g, u, r) { g }",
        )
        .unwrap();
        assert!(Path::new("scripts/aggregators/fedavg.rhai").is_file());
        let found = section("scripts/aggregators/fedavg.rhai")
            .resolve(Some(&dir))
            .unwrap();
        assert_eq!(
            found,
            Some(ScriptSource::File(
                dir.join("scripts/aggregators/fedavg.rhai")
            ))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
