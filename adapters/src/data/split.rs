//! Splitting a data set among clients, and labelling examples by regex.
//!
//! Every splitter is seeded and deterministic, and assigns each example to
//! exactly one client.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::{DataError, Example};

/// How examples are dealt to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SplitterKind {
    /// IID: shuffled, equal sizes (differing by at most one).
    #[default]
    Uniform,
    /// Label skew: per label, client shares drawn from Dirichlet(`alpha`)
    /// (the LDA scheme of FederatedScope), every client non-empty.
    Dirichlet,
    /// One client per value of a meta field, in sorted order of the values.
    Meta,
}

/// Client index lists for `examples`: `uniform` and `dirichlet` deal to
/// `clients` clients; `meta` makes one per value of `field` (and `clients`,
/// when not 0, must equal that count). `dirichlet` reads its labels from
/// `field` too.
pub fn split(
    examples: &[Example],
    kind: SplitterKind,
    clients: usize,
    field: Option<&str>,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    let labels = |what: &str| -> Result<Vec<&str>, DataError> {
        let f = field.ok_or_else(|| {
            DataError::Config(format!("the {what} splitter needs `label` (a meta field)"))
        })?;
        examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.meta.get(f).map(String::as_str).ok_or_else(|| {
                    DataError::Config(format!(
                        "example {i} has no meta field `{f}` (fields: {})",
                        e.meta.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })
            })
            .collect()
    };
    match kind {
        SplitterKind::Uniform => uniform(examples.len(), clients, seed),
        SplitterKind::Dirichlet => dirichlet(&labels("dirichlet")?, clients, alpha, seed),
        SplitterKind::Meta => {
            let labels = labels("meta")?;
            let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (i, l) in labels.iter().enumerate() {
                groups.entry(l).or_default().push(i);
            }
            if clients != 0 && clients != groups.len() {
                return Err(DataError::Config(format!(
                    "the meta splitter found {} values of `{}` ({}), but the course has {clients} clients",
                    groups.len(),
                    field.unwrap_or_default(),
                    groups.keys().copied().collect::<Vec<_>>().join(", ")
                )));
            }
            Ok(groups.into_values().collect())
        }
    }
}

/// The distinct values, sorted, that [`SplitterKind::Meta`] makes clients of.
pub fn meta_values(examples: &[Example], field: &str) -> Vec<String> {
    let mut v: Vec<String> = examples
        .iter()
        .filter_map(|e| e.meta.get(field).cloned())
        .collect();
    v.sort();
    v.dedup();
    v
}

fn check_clients(n: usize, clients: usize) -> Result<(), DataError> {
    if clients == 0 {
        return Err(DataError::Config(
            "the course needs at least one client".into(),
        ));
    }
    if n < clients {
        return Err(DataError::Config(format!(
            "{n} examples cannot give each of {clients} clients one"
        )));
    }
    Ok(())
}

fn uniform(n: usize, clients: usize, seed: u64) -> Result<Vec<Vec<usize>>, DataError> {
    check_clients(n, clients)?;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    Ok((0..clients)
        .map(|c| {
            let mut part = idx[c * n / clients..(c + 1) * n / clients].to_vec();
            part.sort_unstable();
            part
        })
        .collect())
}

/// FederatedScope's `dirichlet_distribution_noniid_slice`: for each label in
/// turn, shuffle its examples and cut them at the cumulative Dirichlet shares;
/// redraw everything until every client has at least one example.
fn dirichlet(
    labels: &[&str],
    clients: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    check_clients(labels.len(), clients)?;
    if !(alpha > 0.0 && alpha.is_finite()) {
        return Err(DataError::Config(format!(
            "dirichlet `alpha` must be positive, got {alpha}"
        )));
    }
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.iter().enumerate() {
        by_label.entry(l).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    const TRIES: usize = 1000;
    for _ in 0..TRIES {
        let mut parts = vec![Vec::new(); clients];
        for idx in by_label.values() {
            let mut idx = idx.clone();
            idx.shuffle(&mut rng);
            let shares = dirichlet_draw(&mut rng, alpha, clients);
            let mut cum = 0.0;
            let mut start = 0;
            for (c, share) in shares.iter().enumerate() {
                cum += share;
                let end = if c + 1 == clients {
                    idx.len()
                } else {
                    ((cum * idx.len() as f64) as usize).clamp(start, idx.len())
                };
                parts[c].extend_from_slice(&idx[start..end]);
                start = end;
            }
        }
        if parts.iter().all(|p| !p.is_empty()) {
            for p in &mut parts {
                p.sort_unstable();
            }
            return Ok(parts);
        }
    }
    Err(DataError::Config(format!(
        "dirichlet split: after {TRIES} draws some of the {clients} clients were still empty; raise `alpha` or lower the number of clients"
    )))
}

/// One draw from a symmetric Dirichlet(`alpha`) over `k` outcomes.
fn dirichlet_draw(rng: &mut ChaCha8Rng, alpha: f64, k: usize) -> Vec<f64> {
    let g: Vec<f64> = (0..k).map(|_| gamma(rng, alpha)).collect();
    let sum: f64 = g.iter().sum();
    if sum > 0.0 {
        g.iter().map(|x| x / sum).collect()
    } else {
        // Every draw underflowed (tiny alpha): all mass on one outcome.
        let mut v = vec![0.0; k];
        v[rng.random_range(0..k)] = 1.0;
        v
    }
}

/// Gamma(`shape`, 1) by Marsaglia and Tsang (2000), boosted for shape < 1.
fn gamma(rng: &mut ChaCha8Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A labeler rule: examples whose text matches `pattern` get `label`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The label given.
    pub label: String,
    /// A regular expression (Rust `regex` syntax; `(?i)` for case-insensitive).
    pub pattern: String,
}

/// What happens to examples no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Unmatched {
    /// Left out (and counted in the report).
    #[default]
    Drop,
    /// Kept under the label `other`.
    Pool,
}

/// Derives a meta field from a text field by the first matching rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labeler {
    /// The meta field written.
    pub field: String,
    /// The text read: `instruction`, `input` or `output`.
    #[serde(default = "default_source")]
    pub source: String,
    /// Rules, tried in order.
    pub rules: Vec<Rule>,
    /// Examples no rule matches.
    #[serde(default)]
    pub unmatched: Unmatched,
}

fn default_source() -> String {
    "instruction".into()
}

impl Labeler {
    /// Labels `examples` in place; returns how many no rule matched (dropped
    /// or pooled as configured).
    pub fn apply(&self, examples: &mut Vec<Example>) -> Result<usize, DataError> {
        let rules: Vec<(Regex, &str)> = self
            .rules
            .iter()
            .map(|r| {
                Regex::new(&r.pattern)
                    .map(|re| (re, r.label.as_str()))
                    .map_err(|e| DataError::Config(format!("labeler rule `{}`: {e}", r.label)))
            })
            .collect::<Result<_, _>>()?;
        fn pick<'e>(source: &str, e: &'e Example) -> Result<&'e str, DataError> {
            Ok(match source {
                "instruction" => &e.instruction,
                "input" => &e.input,
                "output" => &e.output,
                other => {
                    return Err(DataError::Config(format!(
                        "labeler source `{other}`: use instruction, input or output"
                    )))
                }
            })
        }
        let mut unmatched = 0;
        let mut kept = Vec::with_capacity(examples.len());
        for mut e in examples.drain(..) {
            let text = pick(&self.source, &e)?;
            match rules.iter().find(|(re, _)| re.is_match(text)) {
                Some((_, label)) => {
                    e.meta.insert(self.field.clone(), (*label).to_string());
                    kept.push(e);
                }
                None => {
                    unmatched += 1;
                    if self.unmatched == Unmatched::Pool {
                        e.meta.insert(self.field.clone(), "other".into());
                        kept.push(e);
                    }
                }
            }
        }
        *examples = kept;
        Ok(unmatched)
    }
}

/// Splits one client's examples into train / validation / test by fraction
/// (seeded shuffle; the test and validation sizes round down, train gets the rest).
pub fn train_val_test(
    idx: &[usize],
    val: f64,
    test: f64,
    seed: u64,
) -> Result<[Vec<usize>; 3], DataError> {
    if !(0.0..1.0).contains(&val) || !(0.0..1.0).contains(&test) || val + test >= 1.0 {
        return Err(DataError::Config(format!(
            "val_fraction ({val}) and test_fraction ({test}) must be in [0, 1) and sum below 1"
        )));
    }
    let mut v = idx.to_vec();
    v.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n = v.len();
    let (nt, nv) = ((n as f64 * test) as usize, (n as f64 * val) as usize);
    let test_part = v[..nt].to_vec();
    let val_part = v[nt..nt + nv].to_vec();
    let train_part = v[nt + nv..].to_vec();
    Ok([train_part, val_part, test_part].map(|mut p| {
        p.sort_unstable();
        p
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(labels: &[&str]) -> Vec<Example> {
        labels
            .iter()
            .map(|l| Example {
                instruction: String::new(),
                input: String::new(),
                output: String::new(),
                meta: [("label".to_string(), l.to_string())].into(),
            })
            .collect()
    }

    fn assert_partition(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..n).collect::<Vec<_>>(),
            "every example exactly once"
        );
    }

    /// Mean total-variation distance between each client's label histogram and the global one.
    fn mean_tv(parts: &[Vec<usize>], labels: &[&str]) -> f64 {
        let classes: Vec<&str> = {
            let mut c = labels.to_vec();
            c.sort();
            c.dedup();
            c
        };
        let hist = |idx: &[usize]| -> Vec<f64> {
            classes
                .iter()
                .map(|c| idx.iter().filter(|&&i| labels[i] == *c).count() as f64 / idx.len() as f64)
                .collect()
        };
        let global = hist(&(0..labels.len()).collect::<Vec<_>>());
        parts
            .iter()
            .map(|p| {
                hist(p)
                    .iter()
                    .zip(&global)
                    .map(|(a, b)| (a - b).abs())
                    .sum::<f64>()
                    / 2.0
            })
            .sum::<f64>()
            / parts.len() as f64
    }

    #[test]
    fn uniform_sizes_differ_by_at_most_one_and_cover_everything() {
        for (n, k) in [(7473, 3), (10, 3), (5, 5)] {
            let parts = uniform(n, k, 7).unwrap();
            assert_partition(&parts, n);
            let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
        assert_eq!(uniform(100, 4, 1).unwrap(), uniform(100, 4, 1).unwrap());
        assert_ne!(uniform(100, 4, 1).unwrap(), uniform(100, 4, 2).unwrap());
        assert!(uniform(2, 3, 0).is_err());
    }

    #[test]
    fn dirichlet_skew_grows_as_alpha_shrinks() {
        // 8 balanced labels, 2,000 examples, 10 clients, several seeds.
        let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let labels: Vec<&str> = (0..2000).map(|i| names[(i * 7 + i / 3) % 8]).collect();
        let examples = labelled(&labels);
        let (mut low, mut high) = (0.0, 0.0);
        for seed in 0..5 {
            let a = split(
                &examples,
                SplitterKind::Dirichlet,
                10,
                Some("label"),
                0.1,
                seed,
            )
            .unwrap();
            let b = split(
                &examples,
                SplitterKind::Dirichlet,
                10,
                Some("label"),
                100.0,
                seed,
            )
            .unwrap();
            assert_partition(&a, labels.len());
            assert_partition(&b, labels.len());
            assert!(a.iter().all(|p| !p.is_empty()) && b.iter().all(|p| !p.is_empty()));
            assert_eq!(
                a,
                split(
                    &examples,
                    SplitterKind::Dirichlet,
                    10,
                    Some("label"),
                    0.1,
                    seed
                )
                .unwrap(),
                "reproducible from the seed"
            );
            low += mean_tv(&a, &labels) / 5.0;
            high += mean_tv(&b, &labels) / 5.0;
        }
        assert!(low > 0.5, "alpha 0.1 should be strongly skewed: TV {low}");
        assert!(high < 0.1, "alpha 100 should be near IID: TV {high}");
        assert!(low > 5.0 * high);
    }

    #[test]
    fn gamma_draws_have_the_right_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for shape in [0.1, 0.5, 1.0, 4.0] {
            let n = 20_000;
            let mean: f64 = (0..n).map(|_| gamma(&mut rng, shape)).sum::<f64>() / n as f64;
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "shape {shape}: mean {mean}"
            );
        }
    }

    #[test]
    fn meta_makes_one_client_per_value_and_checks_the_count() {
        let examples = labelled(&["x", "y", "x", "z"]);
        let parts = split(&examples, SplitterKind::Meta, 0, Some("label"), 1.0, 0).unwrap();
        assert_eq!(parts, vec![vec![0, 2], vec![1], vec![3]]);
        let e = split(&examples, SplitterKind::Meta, 2, Some("label"), 1.0, 0).unwrap_err();
        assert!(
            e.to_string()
                .contains("found 3 values of `label` (x, y, z)"),
            "{e}"
        );
    }

    #[test]
    fn labeler_takes_the_first_matching_rule_and_drops_or_pools_the_rest() {
        let mk = |s: &str| Example {
            instruction: s.into(),
            input: String::new(),
            output: String::new(),
            meta: BTreeMap::new(),
        };
        let lab = Labeler {
            field: "language".into(),
            source: "instruction".into(),
            rules: vec![
                Rule {
                    label: "JavaScript".into(),
                    pattern: r"(?i)\bjavascript\b".into(),
                },
                Rule {
                    label: "Java".into(),
                    pattern: r"(?i)\bjava\b".into(),
                },
            ],
            unmatched: Unmatched::Drop,
        };
        let mut ex = vec![mk("A Java class"), mk("javascript and Java"), mk("Rust")];
        assert_eq!(lab.apply(&mut ex).unwrap(), 1);
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].meta["language"], "Java");
        assert_eq!(ex[1].meta["language"], "JavaScript");
        let pool = Labeler {
            unmatched: Unmatched::Pool,
            ..lab
        };
        let mut ex = vec![mk("Rust")];
        assert_eq!(pool.apply(&mut ex).unwrap(), 1);
        assert_eq!(ex[0].meta["language"], "other");
    }

    #[test]
    fn train_val_test_fractions_partition_each_client() {
        let idx: Vec<usize> = (100..200).collect();
        let [tr, va, te] = train_val_test(&idx, 0.1, 0.2, 5).unwrap();
        assert_eq!((tr.len(), va.len(), te.len()), (70, 10, 20));
        let mut all: Vec<usize> = tr.iter().chain(&va).chain(&te).copied().collect();
        all.sort_unstable();
        assert_eq!(all, idx);
        assert!(train_val_test(&idx, 0.6, 0.5, 0).is_err());
    }
}
