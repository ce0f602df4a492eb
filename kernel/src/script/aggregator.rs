//! Server aggregation as a Rhai script: `aggregate(global, updates, round)`.
//!
//! The script returns the next global `ParamSet`. Inside, `this` is a map that
//! lives for the whole course — a server optimizer keeps its moments there —
//! and `this.hp` holds the hyperparameters of `[aggregator.params]`:
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
//! next aggregation. A result that does not match the global parameters'
//! names and shapes, or holds NaN or infinity, is an error like any other:
//! the course stops (or, with `scripting.on_script_error = "skip"`, that
//! round falls back to native FedAvg), and the script's state rolls back.

use std::path::{Path, PathBuf};

use rhai::{Array, Dynamic, Map};
use serde::{Deserialize, Serialize};

use super::{OnScriptError, ScriptError, ScriptFile, ScriptHost};
use crate::aggregate::{fedavg_of, AggregateError, Aggregator, ClientUpdate};
use crate::params::ParamSet;

/// The aggregators shipped in `scripts/aggregators/`, compiled into the binary
/// so that a bare name works from any directory.
pub const BUILT_IN: [(&str, &str); 7] = [
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
];

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
    /// Finds the script: the path as given (relative to the working
    /// directory), then relative to `config_dir` and its parent, then a shipped
    /// script of that name in `built_in`. `Ok(None)` when no script is configured.
    pub fn resolve_in(
        &self,
        config_dir: Option<&Path>,
        built_in: &'static [(&'static str, &'static str)],
    ) -> Result<Option<ScriptSource>, ScriptNotFound> {
        let Some(spec) = &self.script else {
            return Ok(None);
        };
        let given = PathBuf::from(spec);
        let mut tried = vec![given.clone()];
        if given.is_relative() {
            if let Some(dir) = config_dir {
                tried.push(dir.join(&given));
                if let Some(parent) = dir.parent() {
                    tried.push(parent.join(&given));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        tried.retain(|p| seen.insert(p.clone()));
        if let Some(found) = tried.iter().find(|p| p.is_file()) {
            return Ok(Some(ScriptSource::File(found.clone())));
        }
        let bare = spec.strip_suffix(".rhai").unwrap_or(spec);
        let bare = bare.rsplit('/').next().unwrap_or(bare);
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
    /// Loads and checks the script (it must define `aggregate` with three parameters).
    pub fn new(
        host: ScriptHost,
        source: &ScriptSource,
        params: &toml::Table,
    ) -> Result<Self, ScriptError> {
        let script = ScriptFile::from_source(&host, source)?;
        let name = script.name().to_string();
        script.require_fn("aggregate", 3)?;
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

    fn run_script(
        &mut self,
        global: &ParamSet,
        updates: &[&ClientUpdate],
        round: u64,
    ) -> Result<ParamSet, ScriptError> {
        let doing = format!("aggregate, round {round}");
        if let Some(map) = self.state.write_lock::<Map>().as_deref_mut() {
            map.insert("hp".into(), Dynamic::from_map(self.hp.clone()));
        }
        let list: Array = updates.iter().map(|&u| Dynamic::from(u.clone())).collect();
        let out = self.host.call(
            &self.script,
            "aggregate",
            &mut self.state,
            (global.clone(), list, round as i64),
            &doing,
        )?;
        let located =
            |message: String| ScriptError::unplaced(self.script.origin(), message, &doing);
        let type_name = out.type_name().to_string();
        let next = out.try_cast::<ParamSet>().ok_or_else(|| {
            located(format!(
                "`aggregate` must return a ParamSet, it returned {type_name}"
            ))
        })?;
        global
            .check_compatible(&next)
            .and_then(|()| next.check_finite())
            .map_err(|e| located(format!("`aggregate` returned unusable parameters: {e}")))?;
        Ok(next)
    }
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
        match self.script.refresh(&self.host) {
            Ok(true) => tracing::info!(
                script = self.script.origin(),
                round,
                "script changed on disk: the new version aggregates from this round on"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!("{e}; the previous version of the script stays in force"),
        }
        // Client-id order, as the native aggregators use; only references are sorted.
        let mut ordered: Vec<&ClientUpdate> = updates.iter().collect();
        ordered.sort_by_key(|u| u.client);
        let state_before = self.state.clone();
        match self.run_script(global, &ordered, round) {
            Ok(next) => Ok(next),
            Err(e) => {
                self.state = state_before;
                match self.host.policy() {
                    OnScriptError::Fail => Err(AggregateError::Other(e.to_string())),
                    OnScriptError::Skip => {
                        self.fallbacks += 1;
                        tracing::warn!("{e}; this round falls back to native FedAvg (scripting.on_script_error = \"skip\")");
                        fedavg_of(&ordered)
                    }
                }
            }
        }
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
        ClientUpdate {
            client,
            n_samples: n,
            params,
        }
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
            err.message.contains("no function `aggregate` with 3"),
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
