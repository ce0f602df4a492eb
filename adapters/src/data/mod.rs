//! Federated fine-tuning data: loaders, prompt templates, splitters.
//!
//! A [`DataSpec`] (the `[data]` section of a course config) names a data set
//! (a built-in one, or a file in a published format), how to split it among
//! clients, and how to turn examples into token sequences. [`build`] loads
//! and splits it; [`FederatedData::tokenize`] prepares each client's train,
//! validation and test examples for the trainer.

mod fetch;
mod load;
mod split;
mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use fetch::{fetch_builtin, FetchSource, SOURCES};
pub use load::{
    gsm8k_gold, json_records, load, Fields, Format, Loaded, RecordError, GSM8K_TRIGGER,
};
pub use split::{meta_values, split, train_val_test, Labeler, Rule, SplitterKind, Unmatched};
pub use template::{collate, tokenize, Template, Tokenized};

use crate::tokenizer::TextTokenizer;

/// One instruction-tuning example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The task.
    pub instruction: String,
    /// Extra context; empty when none.
    pub input: String,
    /// The target response.
    pub output: String,
    /// Other fields: `category` (Dolly), `gold` (GSM8K), labeler output, ….
    pub meta: BTreeMap<String, String>,
}

/// Why data could not be loaded or prepared.
#[derive(Debug, Error)]
pub enum DataError {
    /// A record is malformed.
    #[error("{}:{line}: {msg}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// Line where the record starts (1-based).
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A file cannot be used at all.
    #[error("{}: {msg}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The data configuration is inconsistent.
    #[error("{0}")]
    Config(String),
}

/// A data set fedtune knows by name: where it lives under the data root.
#[derive(Debug, Clone, Copy)]
pub struct BuiltIn {
    /// Its name in configs (`gsm8k`, `dolly`, …).
    pub name: &'static str,
    /// Candidate paths under the data root, in order of preference.
    pub paths: &'static [&'static str],
    /// Record layout.
    pub format: Format,
}

/// The built-in data sets (the files of `../shared/data`).
pub const BUILT_IN: [BuiltIn; 7] = [
    BuiltIn {
        name: "gsm8k",
        paths: &["gsm8k/train.jsonl.gz", "gsm8k/train.jsonl"],
        format: Format::Gsm8k,
    },
    BuiltIn {
        name: "gsm8k-test",
        paths: &["gsm8k/test.jsonl.gz", "gsm8k/test.jsonl"],
        format: Format::Gsm8k,
    },
    BuiltIn {
        name: "codealpaca",
        paths: &[
            "codealpaca/new_codealpaca.jsonl.gz",
            "codealpaca/new_codealpaca.json",
        ],
        format: Format::Instruction,
    },
    BuiltIn {
        name: "codealpaca-2k",
        paths: &[
            "codealpaca/code_alpaca_2k.jsonl.gz",
            "codealpaca/code_alpaca_2k.json",
        ],
        format: Format::Instruction,
    },
    BuiltIn {
        name: "dolly",
        paths: &[
            "dolly-15k/databricks-dolly-15k.jsonl.gz",
            "dolly-15k/databricks-dolly-15k.jsonl",
        ],
        format: Format::Dolly,
    },
    BuiltIn {
        name: "humaneval",
        paths: &["humaneval/HumanEval.jsonl.gz"],
        format: Format::Humaneval,
    },
    BuiltIn {
        name: "alpaca",
        paths: &["alpaca/alpaca_data.json", "alpaca/alpaca_data_cleaned.json"],
        format: Format::Instruction,
    },
];

/// Where data sets are looked for: `explicit` (`--data-root`), else
/// `$FEDTUNE_DATA_ROOT`, else `./data` if it exists, else `../shared/data`.
pub fn data_root(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("FEDTUNE_DATA_ROOT").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("data");
    if local.is_dir() {
        return local;
    }
    PathBuf::from("../shared/data")
}

/// The `[data]` section of a course config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// A built-in data set (see [`BUILT_IN`]); or leave empty and set `path`.
    pub name: Option<String>,
    /// A file in one of the published formats (relative to the data root).
    pub path: Option<PathBuf>,
    /// Record layout; defaults to the built-in set's.
    pub format: Option<Format>,
    /// Field mapping for `format = "custom"`.
    pub fields: Option<Fields>,
    /// Leave malformed records out (counted in the report) instead of failing.
    pub skip_bad_records: bool,
    /// Derives a meta field from the text (for `meta` or `dirichlet` splits).
    pub labeler: Option<Labeler>,
    /// `uniform`, `dirichlet` or `meta`.
    pub splitter: SplitterKind,
    /// The meta field `dirichlet` and `meta` split by.
    pub label: Option<String>,
    /// Dirichlet concentration (smaller: more skewed).
    pub alpha: f64,
    /// Fraction of each client's examples held out for validation.
    pub val_fraction: f64,
    /// Fraction of each client's examples held out for testing.
    pub test_fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Prompt template: `alpaca` (FS-LLM's), `chatml`, or a `.toml` path.
    pub template: String,
    /// How GSM8K answers are trained on (format `gsm8k` only).
    pub gsm8k_answer: Gsm8kAnswer,
    /// Longest token sequence (prompt + response + eos).
    pub max_tokens: usize,
    /// Use at most this many examples per client and split (0: all), for quick runs.
    pub limit_per_client: usize,
    /// Evaluate on at most this many validation and test examples per client (0: all).
    pub eval_limit: usize,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            name: None,
            path: None,
            format: None,
            fields: None,
            skip_bad_records: false,
            labeler: None,
            splitter: SplitterKind::Uniform,
            label: None,
            alpha: 0.5,
            val_fraction: 0.0,
            test_fraction: 0.1,
            seed: 0,
            template: "alpaca".into(),
            gsm8k_answer: Gsm8kAnswer::TheAnswerIs,
            max_tokens: 512,
            limit_per_client: 0,
            eval_limit: 0,
        }
    }
}

/// The form of a GSM8K training answer's last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gsm8kAnswer {
    /// FS-LLM's: `#### N` becomes `The answer is N`, the phrase the 8-shot
    /// evaluation's exemplars end with and its answer extraction looks for.
    TheAnswerIs,
    /// The data set's own `#### N`.
    Raw,
}

impl Gsm8kAnswer {
    /// `answer` (a GSM8K answer ending in `#### N`) in this form: FS-LLM's
    /// `output.replace('####', 'The answer is')`.
    pub fn apply(self, answer: &str) -> String {
        match self {
            Gsm8kAnswer::TheAnswerIs => answer.replace("####", GSM8K_TRIGGER),
            Gsm8kAnswer::Raw => answer.to_string(),
        }
    }
}

/// One client's share: example indices into [`FederatedData::examples`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientSplit {
    /// The client's name: its meta value for `meta` splits, else its id (1-based, as the course numbers clients).
    pub name: String,
    /// Training examples.
    pub train: Vec<usize>,
    /// Validation examples.
    pub val: Vec<usize>,
    /// Test examples.
    pub test: Vec<usize>,
}

impl ClientSplit {
    /// All of the client's examples.
    pub fn all(&self) -> impl Iterator<Item = usize> + '_ {
        self.train
            .iter()
            .chain(&self.val)
            .chain(&self.test)
            .copied()
    }
}

/// A data set loaded and split among clients.
#[derive(Debug, Clone)]
pub struct FederatedData {
    /// The file read.
    pub path: PathBuf,
    /// Every example kept.
    pub examples: Vec<Example>,
    /// Per client, in client-id order.
    pub clients: Vec<ClientSplit>,
    /// Records left out as malformed (`skip_bad_records`): `(line, reason)`.
    pub skipped: Vec<(usize, String)>,
    /// Examples the labeler matched no rule for (dropped or pooled).
    pub unlabelled: usize,
}

/// Resolves `spec`'s file under `root`.
pub fn resolve_path(spec: &DataSpec, root: &Path) -> Result<(PathBuf, Format), DataError> {
    match (&spec.name, &spec.path) {
        (Some(_), Some(_)) => Err(DataError::Config(
            "[data] sets both `name` and `path`; use one".into(),
        )),
        (None, None) => Err(DataError::Config(format!(
            "[data] needs `name` (one of {}) or `path`",
            BUILT_IN.map(|b| b.name).join(", ")
        ))),
        (None, Some(p)) => {
            let path = if p.is_absolute() {
                p.clone()
            } else {
                root.join(p)
            };
            let format = spec.format.ok_or_else(|| {
                DataError::Config(
                    "[data] `path` needs `format` (instruction, dolly, gsm8k, humaneval or custom)"
                        .into(),
                )
            })?;
            if !path.is_file() {
                return Err(DataError::File {
                    path,
                    msg: "no such file (check --data-root / FEDTUNE_DATA_ROOT)".into(),
                });
            }
            Ok((path, format))
        }
        (Some(name), None) => {
            let b = BUILT_IN.iter().find(|b| b.name == name).ok_or_else(|| {
                DataError::Config(format!(
                    "unknown data set `{name}`: built-in ones are {}",
                    BUILT_IN.map(|b| b.name).join(", ")
                ))
            })?;
            let path = b
                .paths
                .iter()
                .map(|p| root.join(p))
                .find(|p| p.is_file())
                .ok_or_else(|| DataError::File {
                    path: root.join(b.paths[0]),
                    msg: format!(
                        "data set `{name}` not found under {} (set --data-root or FEDTUNE_DATA_ROOT, or run `fedtune data fetch {name}`)",
                        root.display()
                    ),
                })?;
            Ok((path, spec.format.unwrap_or(b.format)))
        }
    }
}

/// Loads, labels and splits the data set `spec` names for `clients` clients
/// (0 lets a `meta` split make one client per value).
pub fn build(spec: &DataSpec, root: &Path, clients: usize) -> Result<FederatedData, DataError> {
    let (path, format) = resolve_path(spec, root)?;
    let Loaded {
        mut examples,
        skipped,
    } = load(&path, format, spec.fields.as_ref(), spec.skip_bad_records)?;
    if format == Format::Gsm8k {
        for ex in &mut examples {
            ex.output = spec.gsm8k_answer.apply(&ex.output);
        }
    }
    let unlabelled = match &spec.labeler {
        Some(l) => l.apply(&mut examples)?,
        None => 0,
    };
    let label = spec
        .label
        .as_deref()
        .or(spec.labeler.as_ref().map(|l| l.field.as_str()));
    let parts = split(
        &examples,
        spec.splitter,
        clients,
        label,
        spec.alpha,
        spec.seed,
    )?;
    let names: Vec<String> = match (spec.splitter, label) {
        (SplitterKind::Meta, Some(f)) => meta_values(&examples, f),
        _ => (1..=parts.len()).map(|c| c.to_string()).collect(),
    };
    let clients = parts
        .iter()
        .zip(names)
        .enumerate()
        .map(|(c, (idx, name))| {
            let [mut train, mut val, mut test] = train_val_test(
                idx,
                spec.val_fraction,
                spec.test_fraction,
                spec.seed.wrapping_add(1 + c as u64),
            )?;
            if spec.limit_per_client > 0 {
                for part in [&mut train, &mut val, &mut test] {
                    part.truncate(spec.limit_per_client);
                }
            }
            if spec.eval_limit > 0 {
                for part in [&mut val, &mut test] {
                    part.truncate(spec.eval_limit);
                }
            }
            Ok(ClientSplit {
                name,
                train,
                val,
                test,
            })
        })
        .collect::<Result<_, DataError>>()?;
    Ok(FederatedData {
        path,
        examples,
        clients,
        skipped,
        unlabelled,
    })
}

impl FederatedData {
    /// Tokenizes the examples `idx` with `template`.
    pub fn tokenize(
        &self,
        idx: &[usize],
        template: &Template,
        tok: &TextTokenizer,
        max_tokens: usize,
    ) -> Result<Vec<Tokenized>, DataError> {
        idx.iter()
            .map(|&i| {
                let ex = &self.examples[i];
                tokenize(tok, &template.render(ex), &ex.output, max_tokens)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two GSM8K records in a file under a fresh directory.
    fn gsm8k_file() -> (tempfile::TempDir, DataSpec) {
        let dir = tempfile::tempdir().unwrap();
        let body = concat!(
            "{\"question\": \"Natalia sold 48 clips. How many?\", \"answer\": \"48/2 = <<48/2=24>>24\\n#### 72\"}\n",
            "{\"question\": \"Weng earns $12. How much?\", \"answer\": \"12/60 = 0.2\\n#### 1,010\"}\n",
        );
        std::fs::write(dir.path().join("gsm.jsonl"), body).unwrap();
        let spec = DataSpec {
            path: Some("gsm.jsonl".into()),
            format: Some(Format::Gsm8k),
            test_fraction: 0.0,
            ..DataSpec::default()
        };
        (dir, spec)
    }

    #[test]
    fn gsm8k_targets_end_in_the_answer_is_by_default_and_raw_on_request() {
        let (dir, spec) = gsm8k_file();
        let d = build(&spec, dir.path(), 1).unwrap();
        let outs: Vec<&str> = d.examples.iter().map(|e| e.output.as_str()).collect();
        assert_eq!(
            outs,
            [
                "48/2 = <<48/2=24>>24\nThe answer is 72",
                "12/60 = 0.2\nThe answer is 1,010"
            ]
        );
        // The gold comes from the file's `####` line either way, and the
        // evaluator reads the trained form back to it.
        for e in &d.examples {
            let got = crate::eval::answer::gsm8k_answer(&e.output).unwrap();
            assert!(crate::eval::answer::numbers_equal(&got, &e.meta["gold"]));
        }
        let raw = DataSpec {
            gsm8k_answer: Gsm8kAnswer::Raw,
            ..spec
        };
        let d = build(&raw, dir.path(), 1).unwrap();
        assert!(d.examples[0].output.ends_with("#### 72"));
        assert_eq!(d.examples[1].meta["gold"], "1010");
    }
}
