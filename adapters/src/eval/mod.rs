//! Evaluation: GSM8K, HumanEval, multiple-choice knowledge tasks, closed-book
//! QA and held-out loss, with the base model or an adapter.
//!
//! A task is a list of items of one of two kinds: [`GenItem`]s are answered
//! by generating text (greedy by default) and scored by a rule of the
//! benchmark's own ([`answer`], [`sandbox`]); [`ChoiceItem`]s are answered
//! by the log-likelihood of each choice. Every item is written to a
//! [`ResultLog`] as soon as it is scored, so an interrupted run resumes
//! without repeating finished items. Items share few-shot prefixes whose KV
//! caches are computed once ([`batch`]).

pub mod answer;
pub mod batch;
pub mod sandbox;
pub mod suite;
pub mod tasks;

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::generate::{Generation, GenerationConfig};
use crate::model::{Llama, ProjectionAdapter};
use crate::tokenizer::TextTokenizer;
use batch::{aligned_batches, generate_aligned, loglikelihoods, SharedPrefix};

/// One scored item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    /// The item's id in its data set (`HumanEval/3`, `gsm8k/17`).
    pub id: String,
    /// 1 or 0 (correct or not), or the item's pass@1 estimate.
    pub score: f64,
    /// Its group (an MMLU subject), if the task has groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// What the model answered (the extracted answer, the chosen letter, …).
    pub prediction: String,
    /// The gold answer.
    pub gold: String,
    /// Task-specific facts: the completion, its finish reason, tokens, the sandbox's verdict.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub detail: BTreeMap<String, serde_json::Value>,
}

/// An item answered by generation.
#[derive(Debug, Clone)]
pub struct GenItem {
    /// Its id.
    pub id: String,
    /// Its group, if any.
    pub group: Option<String>,
    /// Which of the task's shared prefixes it continues.
    pub prefix: usize,
    /// Its own prompt text, after the prefix.
    pub text: String,
    /// The gold answer(s), as the scorer reads them.
    pub gold: Vec<String>,
    /// Anything else the scorer needs (HumanEval's test and entry point).
    pub extra: BTreeMap<String, String>,
}

/// An item answered by the most likely choice.
#[derive(Debug, Clone)]
pub struct ChoiceItem {
    /// Its id.
    pub id: String,
    /// Its group, if any.
    pub group: Option<String>,
    /// Which of the task's shared prefixes it continues.
    pub prefix: usize,
    /// Its own context text, after the prefix (the question).
    pub context: String,
    /// The continuations to score (`" A"`, `" B"`, … or whole answers).
    pub choices: Vec<String>,
    /// Labels of the choices as reported (`A`, `B`, …).
    pub labels: Vec<String>,
    /// The index of the right choice.
    pub answer: usize,
}

/// How a task is run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Sequences per forward pass.
    pub batch: usize,
    /// Decoding settings (stop sequences are the task's).
    pub generation: GenerationConfig,
    /// Samples per generation item (pass@k needs several; 1 = greedy).
    pub samples: usize,
    /// HumanEval's sandbox limits.
    pub sandbox: sandbox::Limits,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch: 8,
            generation: GenerationConfig::default(),
            samples: 1,
            sandbox: sandbox::Limits::default(),
        }
    }
}

/// Told after every scored item: items done (this run and before), items in all, tokens generated this run.
pub type OnItem<'a> = &'a mut dyn FnMut(usize, usize, usize);

/// The model an evaluation runs on.
pub struct EvalModel<'a> {
    /// The base model.
    pub model: &'a Llama,
    /// Its tokenizer.
    pub tok: &'a TextTokenizer,
    /// An adapter (LoRA), if any.
    pub adapter: Option<&'a dyn ProjectionAdapter>,
}

/// Why a results log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ResultLogError {
    /// The file or its folder cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file holds another evaluation's items.
    #[error(
        "{path} holds items of another evaluation ({header}); delete it or choose another --out"
    )]
    Another {
        /// The file.
        path: PathBuf,
        /// Its first line, naming that evaluation.
        header: String,
    },
}

/// Where scored items go: a JSON Lines file whose first line names the run
/// (task, model, adapter, settings); reopening it with the same header resumes.
pub struct ResultLog {
    path: Option<PathBuf>,
    file: Option<File>,
    done: BTreeMap<String, ItemResult>,
}

impl ResultLog {
    /// A log kept in memory only.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            file: None,
            done: BTreeMap::new(),
        }
    }

    /// Opens (or creates) `path`. An existing file with the same `header`
    /// gives back its items; one with another header is refused.
    pub fn open(
        path: &Path,
        header: &serde_json::Value,
    ) -> std::result::Result<Self, ResultLogError> {
        let io = |e: std::io::Error| ResultLogError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let mut done = BTreeMap::new();
        if path.is_file() {
            let f = File::open(path).map_err(io)?;
            let mut lines = BufReader::new(f).lines();
            let first = lines.next().transpose().map_err(io)?.unwrap_or_default();
            let theirs: serde_json::Value = serde_json::from_str(&first).unwrap_or_default();
            if &theirs != header {
                return Err(ResultLogError::Another {
                    path: path.to_path_buf(),
                    header: first,
                });
            }
            for (i, line) in lines.enumerate() {
                let line = line.map_err(io)?;
                // A line cut short by an interruption is dropped and its item redone.
                if let Ok(item) = serde_json::from_str::<ItemResult>(&line) {
                    done.insert(item.id.clone(), item);
                } else if !line.trim().is_empty() {
                    tracing::warn!(
                        "{}:{}: unreadable item, evaluated again",
                        path.display(),
                        i + 2
                    );
                }
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ResultLogError::Io {
                path: dir.to_path_buf(),
                source: e,
            })?;
        }
        let fresh = done.is_empty();
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(!fresh)
            .truncate(fresh)
            .open(path)
            .map_err(io)?;
        if fresh {
            writeln!(file, "{header}").map_err(io)?;
        }
        Ok(Self {
            path: Some(path.to_path_buf()),
            file: Some(file),
            done,
        })
    }

    /// Items finished by an earlier run.
    pub fn finished(&self) -> usize {
        self.done.len()
    }

    fn has(&self, id: &str) -> bool {
        self.done.contains_key(id)
    }

    fn push(&mut self, item: ItemResult) -> Result<()> {
        if let Some(f) = self.file.as_mut() {
            let line = serde_json::to_string(&item).map_err(candle_core::Error::msg)?;
            writeln!(f, "{line}")
                .and_then(|()| f.flush())
                .map_err(|e| {
                    candle_core::Error::msg(format!(
                        "cannot write {}: {e}",
                        self.path.as_deref().unwrap_or(Path::new("?")).display()
                    ))
                })?;
        }
        self.done.insert(item.id.clone(), item);
        Ok(())
    }

    /// The results of `ids`, in that order (all of them must be done).
    pub fn results(&self, ids: &[String]) -> Vec<ItemResult> {
        ids.iter()
            .filter_map(|id| self.done.get(id).cloned())
            .collect()
    }
}

/// Generates for `items` (skipping finished ones) and scores each with `score`.
/// Returns the tokens generated.
pub fn run_generation(
    m: &EvalModel,
    prefixes: &[String],
    items: &[GenItem],
    opts: &EvalOptions,
    log: &mut ResultLog,
    score: &mut dyn FnMut(&GenItem, &[Generation]) -> Result<ItemResult>,
    on_item: OnItem,
) -> Result<usize> {
    let total = items.len();
    let mut generated = 0;
    let todo: Vec<&GenItem> = items.iter().filter(|i| !log.has(&i.id)).collect();
    let mut done = total - todo.len();
    on_item(done, total, 0);
    let by_prefix = group_by_prefix(todo.iter().map(|i| i.prefix));
    for (p, members) in by_prefix {
        let prefix = SharedPrefix::new(m.model, m.tok, &prefixes[p], m.adapter)?;
        let empty = SharedPrefix::new(m.model, m.tok, "", m.adapter)?;
        // Each item's tokens after the prefix (or its whole prompt when a
        // token would straddle the boundary).
        let mut shared = Vec::new();
        let mut alone = Vec::new();
        for &k in &members {
            let item = todo[k];
            match prefix.continuation(m.tok, &item.text)? {
                Some(ids) if !prefix.is_empty() => shared.push((k, ids)),
                _ => {
                    let ids = m
                        .tok
                        .encode(&format!("{}{}", prefixes[p], item.text))
                        .map_err(candle_core::Error::msg)?;
                    alone.push((k, ids));
                }
            }
        }
        for (pre, list) in [(&prefix, shared), (&empty, alone)] {
            let lengths: Vec<usize> = list.iter().map(|(_, ids)| ids.len()).collect();
            // Several samples of one item ride in the same batch.
            let per = opts.samples.max(1);
            let rows = (opts.batch / per).max(1);
            for group in aligned_batches(&lengths, rows) {
                let mut seqs: Vec<&[u32]> = Vec::new();
                let mut seeds = Vec::new();
                for &g in &group {
                    for s in 0..per {
                        seqs.push(&list[g].1);
                        seeds.push(s as u64);
                    }
                }
                let out = generate_aligned(
                    m.model,
                    m.tok,
                    pre,
                    &seqs,
                    &seeds,
                    &opts.generation,
                    m.adapter,
                )?;
                for (j, &g) in group.iter().enumerate() {
                    let gens = &out[j * per..(j + 1) * per];
                    generated += gens.iter().map(|x| x.ids.len()).sum::<usize>();
                    let item = todo[list[g].0];
                    let result = score(item, gens)?;
                    log.push(result)?;
                    done += 1;
                    on_item(done, total, generated);
                }
            }
        }
    }
    Ok(generated)
}

/// Scores `items` (skipping finished ones) by the most likely choice.
pub fn run_choices(
    m: &EvalModel,
    prefixes: &[String],
    items: &[ChoiceItem],
    opts: &EvalOptions,
    log: &mut ResultLog,
    on_item: OnItem,
) -> Result<()> {
    let total = items.len();
    let todo: Vec<&ChoiceItem> = items.iter().filter(|i| !log.has(&i.id)).collect();
    let mut done = total - todo.len();
    on_item(done, total, 0);
    for (p, members) in group_by_prefix(todo.iter().map(|i| i.prefix)) {
        let prefix = SharedPrefix::new(m.model, m.tok, &prefixes[p], m.adapter)?;
        let empty = SharedPrefix::new(m.model, m.tok, "", m.adapter)?;
        // Context and choice tokens, each tokenized jointly with what precedes
        // it; an item whose first token would straddle the prefix runs alone.
        let (mut shared, mut alone) = (Vec::new(), Vec::new());
        for &k in &members {
            let item = todo[k];
            let (pre, ctx, list) = match prefix.continuation(m.tok, &item.context)? {
                Some(ids) if !prefix.is_empty() => (&prefix, ids, &mut shared),
                _ => {
                    let whole = format!("{}{}", prefixes[p], item.context);
                    let ids = m.tok.encode(&whole).map_err(candle_core::Error::msg)?;
                    (&empty, ids, &mut alone)
                }
            };
            let mut choices = Vec::new();
            for c in &item.choices {
                let both = if pre.is_empty() {
                    let whole = format!("{}{}{c}", prefixes[p], item.context);
                    Some(m.tok.encode(&whole).map_err(candle_core::Error::msg)?)
                } else {
                    pre.continuation(m.tok, &format!("{}{c}", item.context))?
                };
                let ids = match both {
                    Some(ids) if ids.len() > ctx.len() && ids[..ctx.len()] == ctx[..] => {
                        ids[ctx.len()..].to_vec()
                    }
                    _ => m
                        .tok
                        .encode_continuation(c)
                        .map_err(candle_core::Error::msg)?,
                };
                choices.push(ids);
            }
            list.push((k, ctx, choices));
        }
        for (prefix, tokenized) in [(&prefix, shared), (&empty, alone)] {
            let lengths: Vec<usize> = tokenized.iter().map(|(_, c, _)| c.len()).collect();
            for group in aligned_batches(&lengths, opts.batch) {
                let single = group
                    .iter()
                    .all(|&g| tokenized[g].2.iter().all(|c| c.len() == 1));
                let scores: Vec<Vec<f64>> = if single {
                    // One row per item: the next-token distribution after its context.
                    next_token_scores(m, prefix, &group, &tokenized)?
                } else {
                    let mut out = Vec::new();
                    for &g in &group {
                        let (_, ctx, choices) = &tokenized[g];
                        let pairs: Vec<(&[u32], &[u32])> =
                            choices.iter().map(|c| (&ctx[..], &c[..])).collect();
                        out.push(loglikelihoods(m.model, prefix, &pairs, m.adapter)?);
                    }
                    out
                };
                for (&g, lls) in group.iter().zip(scores) {
                    let item = todo[tokenized[g].0];
                    let best = lls
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i)
                        .unwrap_or(0);
                    let mut detail = BTreeMap::new();
                    detail.insert("loglikelihoods".into(), serde_json::json!(lls));
                    log.push(ItemResult {
                        id: item.id.clone(),
                        score: f64::from(u8::from(best == item.answer)),
                        group: item.group.clone(),
                        prediction: item.labels[best].clone(),
                        gold: item.labels[item.answer].clone(),
                        detail,
                    })?;
                    done += 1;
                    on_item(done, total, 0);
                }
            }
        }
    }
    Ok(())
}

/// An item's index, its context tokens and each choice's tokens.
type Tokenized = (usize, Vec<u32>, Vec<Vec<u32>>);

/// Log-probabilities of each item's single-token choices after its context.
fn next_token_scores(
    m: &EvalModel,
    prefix: &SharedPrefix,
    group: &[usize],
    tokenized: &[Tokenized],
) -> Result<Vec<Vec<f64>>> {
    let len = tokenized[group[0]].1.len();
    let flat: Vec<u32> = group
        .iter()
        .flat_map(|&g| tokenized[g].1.iter().copied())
        .collect();
    let mut cache = prefix.cache_for(group.len())?;
    let x = Tensor::from_vec(flat, (group.len(), len), m.model.device())?;
    let last = m
        .model
        .forward_cached_last(&x, &mut cache, m.adapter)?
        .to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&last, D::Minus1)?;
    group
        .iter()
        .enumerate()
        .map(|(row, &g)| {
            let r = logp.get(row)?;
            tokenized[g]
                .2
                .iter()
                .map(|c| Ok(f64::from(r.get(c[0] as usize)?.to_scalar::<f32>()?)))
                .collect()
        })
        .collect()
}

/// Item positions grouped by prefix, prefixes in order of first use.
fn group_by_prefix(prefixes: impl Iterator<Item = usize>) -> Vec<(usize, Vec<usize>)> {
    let mut order: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut seen = HashSet::new();
    for (k, p) in prefixes.enumerate() {
        if seen.insert(p) {
            order.push((p, Vec::new()));
        }
        order
            .iter_mut()
            .find(|(q, _)| *q == p)
            .expect("inserted above")
            .1
            .push(k);
    }
    order
}

/// The mean score overall and per group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Items scored.
    pub items: usize,
    /// Mean score (accuracy, pass@1, exact match).
    pub score: f64,
    /// Mean score per group, when the task has groups.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupScore>,
}

/// One group's mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupScore {
    /// Items in the group.
    pub items: usize,
    /// Their mean score.
    pub score: f64,
}

/// Summarizes `results`.
pub fn summarize(results: &[ItemResult]) -> Summary {
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in results {
        if let Some(g) = &r.group {
            groups.entry(g.clone()).or_default().push(r.score);
        }
    }
    let scores: Vec<f64> = results.iter().map(|r| r.score).collect();
    Summary {
        items: results.len(),
        score: mean(&scores),
        groups: groups
            .into_iter()
            .map(|(g, xs)| {
                (
                    g,
                    GroupScore {
                        items: xs.len(),
                        score: mean(&xs),
                    },
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, score: f64, group: Option<&str>) -> ItemResult {
        ItemResult {
            id: id.into(),
            score,
            group: group.map(String::from),
            prediction: "p".into(),
            gold: "g".into(),
            detail: BTreeMap::new(),
        }
    }

    #[test]
    fn a_result_log_resumes_its_own_run_and_refuses_another() {
        let dir = std::env::temp_dir().join(format!("fedtune-evallog-{}", std::process::id()));
        let path = dir.join("x.items.jsonl");
        let _ = std::fs::remove_dir_all(&dir);
        let header = serde_json::json!({"task": "gsm8k", "samples": 1});
        let mut log = ResultLog::open(&path, &header).unwrap();
        log.push(item("a", 1.0, None)).unwrap();
        log.push(item("b", 0.0, None)).unwrap();
        drop(log);
        // An interruption mid-line: the broken last line is redone, the rest kept.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{{\"id\": \"c\", \"sco").unwrap();
        drop(f);
        let again = ResultLog::open(&path, &header).unwrap();
        assert_eq!(again.finished(), 2);
        assert!(again.has("a") && again.has("b") && !again.has("c"));
        assert_eq!(
            again.results(&["b".into(), "a".into()]),
            [item("b", 0.0, None), item("a", 1.0, None)]
        );
        let other = serde_json::json!({"task": "gsm8k", "samples": 4});
        let e = ResultLog::open(&path, &other).err().unwrap().to_string();
        assert!(e.contains("another evaluation"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn summaries_average_overall_and_per_group() {
        let s = summarize(&[
            item("1", 1.0, Some("law")),
            item("2", 0.0, Some("law")),
            item("3", 1.0, Some("math")),
            item("4", 0.5, Some("math")),
        ]);
        assert_eq!(s.items, 4);
        assert!((s.score - 0.625).abs() < 1e-12);
        assert_eq!(s.groups["law"].score, 0.5);
        assert_eq!(s.groups["math"].items, 2);
        assert_eq!(s.groups["math"].score, 0.75);
    }
}
