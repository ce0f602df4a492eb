//! The search space: which config keys a search varies, and over what.
//!
//! A space file is TOML; each key is a config path and each value a domain:
//!
//! ```toml
//! optim.lr = { log-uniform = [1e-5, 1e-2] }
//! lora.lora_alpha = { int = [8, 64] }
//! lora.lora_dropout = { uniform = [0.0, 0.2] }
//! lora.r = { choice = [4, 8, 16] }
//! ```
//!
//! (`optim.lr = …` is TOML for the table `optim` with the key `lr`; a quoted
//! `"optim.lr" = …` means the same here.) A [`Space`] samples
//! configurations, lays out grids, and maps a configuration to and from the
//! unit cube, where the Gaussian process of [`super::gp`] works.
//! Configurations are [`Config`]s: config path → TOML value, the
//! `--set` overrides a trial runs with.

use std::collections::BTreeMap;

use rand::Rng;
use thiserror::Error;

/// A configuration to try: config path → value (what `--set` would say).
pub type Config = BTreeMap<String, toml::Value>;

/// What is wrong with a space file, naming the key.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{origin}: `{key}`: {message}")]
pub struct SpaceError {
    /// The space file.
    pub origin: String,
    /// The config path whose domain is wrong (`""` for the file as a whole).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// The values one key may take.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// A real number in `[low, high]`, uniformly.
    Uniform {
        /// Smallest value.
        low: f64,
        /// Largest value.
        high: f64,
    },
    /// A positive real number in `[low, high]`, uniformly in its logarithm.
    LogUniform {
        /// Smallest value (> 0).
        low: f64,
        /// Largest value.
        high: f64,
    },
    /// An integer in `low..=high` (uniformly in its logarithm with `log = true`).
    Int {
        /// Smallest value.
        low: i64,
        /// Largest value.
        high: i64,
        /// Sample in log space (needs `low >= 1`).
        log: bool,
    },
    /// One of these values.
    Choice(Vec<toml::Value>),
}

impl std::fmt::Display for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Domain::Uniform { low, high } => write!(f, "uniform [{low}, {high}]"),
            Domain::LogUniform { low, high } => write!(f, "log-uniform [{low}, {high}]"),
            Domain::Int { low, high, log } => {
                let scale = if *log { " (log scale)" } else { "" };
                write!(f, "int [{low}, {high}]{scale}")
            }
            Domain::Choice(values) => {
                let v: Vec<String> = values.iter().map(ToString::to_string).collect();
                write!(f, "choice [{}]", v.join(", "))
            }
        }
    }
}

/// One varied key.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The config path, as `--set` names it (`optim.lr`).
    pub key: String,
    /// Its domain.
    pub domain: Domain,
}

/// The keys a search varies, sorted by key.
#[derive(Debug, Clone, PartialEq)]
pub struct Space {
    /// The varied keys.
    pub params: Vec<Param>,
    /// The file it came from (errors name it).
    pub origin: String,
}

const KINDS: [&str; 4] = ["uniform", "log-uniform", "int", "choice"];

impl Space {
    /// Reads a space file.
    pub fn load(path: &std::path::Path) -> Result<Self, SpaceError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SpaceError {
            origin: origin.clone(),
            key: String::new(),
            message: format!("cannot read the space file: {e}"),
        })?;
        Self::parse(&text, &origin)
    }

    /// Parses space text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpaceError> {
        let err = |key: &str, message: String| SpaceError {
            origin: origin.to_string(),
            key: key.to_string(),
            message,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err("", format!("invalid TOML: {}", e.message())))?;
        let mut params = Vec::new();
        flatten(&table, "", &mut params, &err)?;
        if params.is_empty() {
            return Err(err(
                "",
                "the space varies nothing: give at least one key, as in optim.lr = { log-uniform = [1e-5, 1e-2] }".into(),
            ));
        }
        params.sort_by(|a, b| a.key.cmp(&b.key));
        if let Some(w) = params.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(err(&w[0].key, "given twice".into()));
        }
        Ok(Self {
            params,
            origin: origin.to_string(),
        })
    }

    /// The number of varied keys.
    pub fn dims(&self) -> usize {
        self.params.len()
    }

    /// A configuration drawn at random.
    pub fn sample(&self, rng: &mut impl Rng) -> Config {
        let u: Vec<f64> = (0..self.dims()).map(|_| rng.random::<f64>()).collect();
        self.from_unit(&u)
    }

    /// The configuration at `u` in the unit cube (one coordinate per key,
    /// each clamped to `[0, 1]`): linear (or logarithmic) in a range, equal
    /// slices of the cube for each choice.
    pub fn from_unit(&self, u: &[f64]) -> Config {
        self.params
            .iter()
            .zip(u)
            .map(|(p, &u)| (p.key.clone(), p.domain.at(u.clamp(0.0, 1.0))))
            .collect()
    }

    /// Where `config` lies in the unit cube (the inverse of [`Self::from_unit`]
    /// up to rounding; a choice maps to the middle of its slice). `None` when
    /// a key is missing or its value is not in the domain's type.
    pub fn to_unit(&self, config: &Config) -> Option<Vec<f64>> {
        self.params
            .iter()
            .map(|p| config.get(&p.key).and_then(|v| p.domain.position(v)))
            .collect()
    }

    /// Every combination of `points` values per continuous or integer key
    /// (evenly spaced, in log space where the domain is logarithmic; an
    /// integer range with fewer values gives each once) and every value of
    /// each choice; the first key varies slowest.
    pub fn grid(&self, points: usize) -> Vec<Config> {
        let axes: Vec<Vec<toml::Value>> =
            self.params.iter().map(|p| p.domain.axis(points)).collect();
        let mut out = vec![Config::new()];
        for (p, axis) in self.params.iter().zip(&axes) {
            out = out
                .into_iter()
                .flat_map(|c| {
                    axis.iter().map(move |v| {
                        let mut c = c.clone();
                        c.insert(p.key.clone(), v.clone());
                        c
                    })
                })
                .collect();
        }
        out
    }

    /// The values every key's domain must accept: its bounds and every choice
    /// (checked against the course before any trial runs).
    pub fn extremes(&self) -> Vec<(String, toml::Value)> {
        self.params
            .iter()
            .flat_map(|p| {
                let values = match &p.domain {
                    Domain::Uniform { low, high } | Domain::LogUniform { low, high } => {
                        vec![toml::Value::Float(*low), toml::Value::Float(*high)]
                    }
                    Domain::Int { low, high, .. } => {
                        vec![toml::Value::Integer(*low), toml::Value::Integer(*high)]
                    }
                    Domain::Choice(v) => v.clone(),
                };
                values.into_iter().map(|v| (p.key.clone(), v))
            })
            .collect()
    }
}

/// `config` as `--set` arguments (`optim.lr=0.001`).
pub fn overrides(config: &Config) -> Vec<String> {
    config.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Collects the domains under `table`, whose keys extend `prefix`.
fn flatten(
    table: &toml::Table,
    prefix: &str,
    out: &mut Vec<Param>,
    err: &dyn Fn(&str, String) -> SpaceError,
) -> Result<(), SpaceError> {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let toml::Value::Table(inner) = value else {
            return Err(err(
                &key,
                format!("expected a domain such as {{ uniform = [0.0, 1.0] }}, found {value}"),
            ));
        };
        if inner.keys().any(|k| KINDS.contains(&k.as_str())) {
            out.push(Param {
                domain: Domain::parse(inner, |m| err(&key, m))?,
                key,
            });
        } else if !inner.is_empty() {
            flatten(inner, &key, out, err)?;
        } else {
            return Err(err(
                &key,
                "expected a domain (uniform, log-uniform, int or choice), found {}".into(),
            ));
        }
    }
    Ok(())
}

impl Domain {
    /// Reads `{ uniform = [lo, hi] }`, `{ log-uniform = [lo, hi] }`,
    /// `{ int = [lo, hi], log = false }` or `{ choice = [...] }`.
    fn parse(t: &toml::Table, bad: impl Fn(String) -> SpaceError) -> Result<Self, SpaceError> {
        let kinds: Vec<&str> = t
            .keys()
            .map(String::as_str)
            .filter(|k| KINDS.contains(k))
            .collect();
        if kinds.len() != 1 {
            return Err(bad(format!("give one domain, not {}", kinds.join(" and "))));
        }
        let kind = kinds[0];
        let allowed: &[&str] = if kind == "int" {
            &["int", "log"]
        } else {
            &[kind]
        };
        if let Some(extra) = t.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(bad(format!("unknown field `{extra}` in a {kind} domain")));
        }
        let value = &t[kind];
        if kind == "choice" {
            let values = value.as_array().ok_or_else(|| {
                bad("a choice is a list of values, as in { choice = [4, 8, 16] }".into())
            })?;
            if values.is_empty() {
                return Err(bad("the choice is empty: list at least one value".into()));
            }
            return Ok(Domain::Choice(values.clone()));
        }
        let pair = value.as_array().filter(|a| a.len() == 2).ok_or_else(|| {
            bad(format!(
                "a {kind} domain is [low, high], as in {{ {kind} = [1, 10] }}"
            ))
        })?;
        if kind == "int" {
            let (Some(low), Some(high)) = (pair[0].as_integer(), pair[1].as_integer()) else {
                return Err(bad("an int domain's bounds are integers".into()));
            };
            let log = match t.get("log") {
                None => false,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad("`log` is true or false".into()))?,
            };
            if low > high {
                return Err(bad(format!("the domain is empty: low {low} > high {high}")));
            }
            if log && low < 1 {
                return Err(bad(format!(
                    "a log-scaled int domain needs low >= 1, got {low}"
                )));
            }
            return Ok(Domain::Int { low, high, log });
        }
        let num = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        let (Some(low), Some(high)) = (num(&pair[0]), num(&pair[1])) else {
            return Err(bad(format!("a {kind} domain's bounds are numbers")));
        };
        if !(low.is_finite() && high.is_finite()) {
            return Err(bad("the bounds must be finite".into()));
        }
        if low >= high {
            return Err(bad(format!(
                "the domain is empty: low {low} >= high {high}"
            )));
        }
        if kind == "log-uniform" {
            if low <= 0.0 {
                return Err(bad(format!(
                    "a log-uniform domain needs low > 0, got {low}"
                )));
            }
            return Ok(Domain::LogUniform { low, high });
        }
        Ok(Domain::Uniform { low, high })
    }

    /// The value at `u` in `[0, 1]`.
    fn at(&self, u: f64) -> toml::Value {
        match self {
            Domain::Uniform { low, high } => toml::Value::Float(low + u * (high - low)),
            // The ends exactly: exp(ln(x)) need not give x back.
            Domain::LogUniform { low, .. } if u <= 0.0 => toml::Value::Float(*low),
            Domain::LogUniform { high, .. } if u >= 1.0 => toml::Value::Float(*high),
            Domain::LogUniform { low, high } => toml::Value::Float(
                (low.ln() + u * (high.ln() - low.ln()))
                    .exp()
                    .clamp(*low, *high),
            ),
            Domain::Int { low, high, log } => {
                // Each integer owns an equal slice (in log space with `log`).
                let (l, h) = (*low as f64, *high as f64);
                let v = if *log {
                    (l.ln() + u * ((h + 1.0).ln() - l.ln())).exp().floor()
                } else {
                    (l + u * (h - l + 1.0)).floor()
                };
                toml::Value::Integer((v as i64).clamp(*low, *high))
            }
            Domain::Choice(values) => {
                let i = ((u * values.len() as f64) as usize).min(values.len() - 1);
                values[i].clone()
            }
        }
    }

    /// Where `v` lies in `[0, 1]`.
    fn position(&self, v: &toml::Value) -> Option<f64> {
        let num = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        Some(
            match self {
                Domain::Uniform { low, high } => (num? - low) / (high - low),
                Domain::LogUniform { low, high } => {
                    (num?.max(*low).ln() - low.ln()) / (high.ln() - low.ln())
                }
                Domain::Int { low, high, log } => {
                    let (l, h, x) = (*low as f64, *high as f64, num?);
                    if *log {
                        ((x + 0.5).ln() - l.ln()) / ((h + 1.0).ln() - l.ln())
                    } else {
                        (x + 0.5 - l) / (h - l + 1.0)
                    }
                }
                Domain::Choice(values) => {
                    let i = values.iter().position(|c| c == v)?;
                    (i as f64 + 0.5) / values.len() as f64
                }
            }
            .clamp(0.0, 1.0),
        )
    }

    /// `points` evenly spaced values (every choice; fewer when an integer range is small).
    fn axis(&self, points: usize) -> Vec<toml::Value> {
        let points = points.max(1);
        let spaced = |i: usize| {
            if points == 1 {
                0.5
            } else {
                i as f64 / (points - 1) as f64
            }
        };
        match self {
            Domain::Choice(values) => values.clone(),
            Domain::Uniform { low, high } => (0..points)
                .map(|i| toml::Value::Float(low + spaced(i) * (high - low)))
                .collect(),
            Domain::LogUniform { .. } => (0..points).map(|i| self.at(spaced(i))).collect(),
            Domain::Int { low, high, log } => {
                let (l, h) = (*low as f64, *high as f64);
                let mut v: Vec<i64> = (0..points)
                    .map(|i| {
                        let x = if *log {
                            (l.ln() + spaced(i) * (h.ln() - l.ln())).exp()
                        } else {
                            l + spaced(i) * (h - l)
                        };
                        x.round() as i64
                    })
                    .collect();
                v.dedup();
                v.into_iter().map(toml::Value::Integer).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const SPACE: &str = r#"
optim.lr = { log-uniform = [1e-5, 1e-2] }
"lora.lora_alpha" = { int = [8, 64] }
lora.lora_dropout = { uniform = [0.0, 0.2] }
lora.r = { choice = [4, 8, 16] }
"#;

    #[test]
    fn dotted_and_quoted_keys_name_the_same_paths() {
        let s = Space::parse(SPACE, "s.toml").unwrap();
        let keys: Vec<&str> = s.params.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["lora.lora_alpha", "lora.lora_dropout", "lora.r", "optim.lr"]
        );
    }

    #[test]
    fn samples_stay_in_their_domains_and_cover_them() {
        let s = Space::parse(SPACE, "s.toml").unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut below_1e4, mut alphas, mut ranks) = (
            0,
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        for _ in 0..2000 {
            let c = s.sample(&mut rng);
            let lr = c["optim.lr"].as_float().unwrap();
            assert!((1e-5..=1e-2).contains(&lr));
            below_1e4 += usize::from(lr < 1e-4);
            let a = c["lora.lora_alpha"].as_integer().unwrap();
            assert!((8..=64).contains(&a));
            alphas.insert(a);
            let d = c["lora.lora_dropout"].as_float().unwrap();
            assert!((0.0..=0.2).contains(&d));
            ranks.insert(c["lora.r"].as_integer().unwrap());
        }
        // Log-uniform: a third of the mass lies in each decade.
        assert!((560..=780).contains(&below_1e4), "{below_1e4}");
        assert_eq!(
            alphas.len(),
            57,
            "every integer is drawn, the ends included"
        );
        assert_eq!(ranks.into_iter().collect::<Vec<_>>(), [4, 8, 16]);
    }

    #[test]
    fn the_unit_cube_round_trips() {
        let s = Space::parse(SPACE, "s.toml").unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let c = s.sample(&mut rng);
            let u = s.to_unit(&c).unwrap();
            assert!(u.iter().all(|x| (0.0..=1.0).contains(x)));
            let back = s.from_unit(&u);
            for (k, v) in &c {
                match (v, &back[k]) {
                    (toml::Value::Float(a), toml::Value::Float(b)) => {
                        assert!((a - b).abs() <= 1e-9 * a.abs().max(1e-9), "{k}: {a} {b}")
                    }
                    (a, b) => assert_eq!(a, b, "{k}"),
                }
            }
        }
    }

    #[test]
    fn a_grid_is_every_combination() {
        let s = Space::parse(
            "a = { uniform = [0.0, 1.0] }\nb = { choice = [\"x\", \"y\"] }\nc = { int = [1, 2] }\nd = { log-uniform = [1e-4, 1e-2] }",
            "g.toml",
        )
        .unwrap();
        let g = s.grid(3);
        assert_eq!(g.len(), 3 * 2 * 2 * 3);
        let a: Vec<f64> = g
            .iter()
            .step_by(12)
            .map(|c| c["a"].as_float().unwrap())
            .collect();
        assert_eq!(a, [0.0, 0.5, 1.0]);
        let d: Vec<f64> = g[..3].iter().map(|c| c["d"].as_float().unwrap()).collect();
        assert!((d[1] - 1e-3).abs() < 1e-12, "log spacing: {d:?}");
        assert_eq!(overrides(&g[0]), ["a=0.0", "b=\"x\"", "c=1", "d=0.0001"]);
    }

    #[test]
    fn domains_read_as_written() {
        let s = Space::parse(
            "a = { log-uniform = [1e-5, 0.003] }\nb = { int = [1, 64], log = true }\nc = { choice = [4, \"x\"] }\nd = { uniform = [0, 1] }",
            "s.toml",
        )
        .unwrap();
        let shown: Vec<String> = s.params.iter().map(|p| p.domain.to_string()).collect();
        assert_eq!(
            shown,
            [
                "log-uniform [0.00001, 0.003]",
                "int [1, 64] (log scale)",
                "choice [4, \"x\"]",
                "uniform [0, 1]"
            ]
        );
    }

    #[test]
    fn bad_domains_name_their_key() {
        let bad = [
            ("optim.lr = { uniform = [0.1, 0.1] }", "optim.lr", "empty"),
            (
                "optim.lr = { log-uniform = [0.0, 0.1] }",
                "optim.lr",
                "low > 0",
            ),
            ("lora.r = { choice = [] }", "lora.r", "empty"),
            ("lora.r = { int = [8, 4] }", "lora.r", "empty"),
            ("lora.r = { int = [1.5, 4] }", "lora.r", "integers"),
            (
                "lora.r = { range = [1, 4] }",
                "lora.r.range",
                "expected a domain",
            ),
            ("lora.r = 4", "lora.r", "expected a domain"),
            ("x = { uniform = [0, 1], choice = [1] }", "x", "one domain"),
            ("", "", "varies nothing"),
        ];
        for (text, key, says) in bad {
            let e = Space::parse(text, "space.toml").unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.to_string().contains(says), "{text}: {e}");
            assert!(e.to_string().starts_with("space.toml: "), "{e}");
        }
    }
}
