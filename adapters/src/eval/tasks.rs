//! The evaluation tasks: where their data lies, how items are prompted, and
//! how answers are scored.
//!
//! | task | data (under the data root) | prompt | score |
//! |---|---|---|---|
//! | `gsm8k` | `gsm8k/test.jsonl.gz` | 8-shot chain of thought (Wei et al.'s exemplars, `configs/eval/gsm8k-cot-8shot.jsonl`) | FS-LLM's extraction (the first number after "The answer is", else the last number) equals the number after `####` |
//! | `humaneval` | `humaneval/HumanEval.jsonl.gz` | the function's signature and docstring | `prompt + completion + test + check(entry_point)` exits 0 in the sandbox (pass@1) |
//! | `mmlu` | `mmlu/test.jsonl.gz`, `mmlu/dev.jsonl.gz` | 5-shot per subject, as Hendrycks et al. | the likeliest of ` A`…` D` |
//! | `openbookqa` | `openbookqa/test.jsonl.gz` | `Question: …\nAnswer:` | the likeliest choice text |
//! | `mc` | any JSONL of `question`, `choices`, `answer` | as `openbookqa` | the likeliest choice text |
//! | `nq-open` | `nq-open/NQ-open.dev.jsonl.gz` | `Q: …?\nA:` | normalized exact match with any gold answer; SQuAD's token F1 beside it (closed book: no passage is given) |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::answer::{exact_match, f1, gsm8k_answer, numbers_equal, pass_at_k};
use super::sandbox::{run_python, Limits, Outcome};
use super::{ChoiceItem, GenItem, ItemResult};
use crate::data::{gsm8k_gold, json_records};
use crate::generate::Generation;

/// Wei et al.'s eight GSM8K exemplars, as shipped in `configs/eval/`.
pub const GSM8K_EXEMPLARS: &str = include_str!("../../assets/eval/gsm8k-cot-8shot.jsonl");

/// Stop sequences of a GSM8K answer: the next question, or the blank line
/// that ends every exemplar's answer (lm-evaluation-harness stops there too).
pub const GSM8K_STOP: [&str; 4] = ["Q:", "Question:", "\n\n", "<|im_end|>"];

/// HumanEval's stop sequences (Chen et al.): the function's body has ended.
pub const HUMANEVAL_STOP: [&str; 5] = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"];

/// Stops of a short closed-book answer.
pub const NQ_STOP: [&str; 4] = ["\n", ".", ",", "<|im_end|>"];

/// The tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// GSM8K test, 8-shot chain of thought.
    Gsm8k,
    /// HumanEval, pass@1 in the sandbox.
    HumanEval,
    /// MMLU test, 5-shot, 57 subjects.
    Mmlu,
    /// OpenBookQA test.
    OpenBookQa,
    /// NaturalQuestions open, closed book.
    NqOpen,
    /// A JSONL file of `question`, `choices`, `answer`.
    Mc(PathBuf),
}

impl Task {
    /// Parses a task name (`mc:PATH` for a file of one's own).
    pub fn parse(name: &str) -> Result<Self, TaskError> {
        Ok(match name {
            "gsm8k" => Task::Gsm8k,
            "humaneval" => Task::HumanEval,
            "mmlu" => Task::Mmlu,
            "openbookqa" => Task::OpenBookQa,
            "nq-open" | "nq_open" => Task::NqOpen,
            other => match other.strip_prefix("mc:") {
                Some(path) if !path.is_empty() => Task::Mc(PathBuf::from(path)),
                _ => return Err(TaskError::Unknown(other.to_string())),
            },
        })
    }

    /// The task's name in results.
    pub fn name(&self) -> String {
        match self {
            Task::Gsm8k => "gsm8k".into(),
            Task::HumanEval => "humaneval".into(),
            Task::Mmlu => "mmlu".into(),
            Task::OpenBookQa => "openbookqa".into(),
            Task::NqOpen => "nq-open".into(),
            Task::Mc(p) => format!("mc:{}", p.display()),
        }
    }

    /// What the score means.
    pub fn metric(&self) -> &'static str {
        match self {
            Task::HumanEval => "pass@1",
            Task::NqOpen => "exact_match",
            _ => "accuracy",
        }
    }
}

/// A task's items, prompts and prefixes, ready to run.
pub enum Items {
    /// Answered by generation.
    Gen {
        /// Shared prompt prefixes.
        prefixes: Vec<String>,
        /// The items.
        items: Vec<GenItem>,
        /// Stop sequences.
        stop: Vec<String>,
        /// Most tokens to generate.
        max_new_tokens: usize,
    },
    /// Answered by the likeliest choice.
    Choice {
        /// Shared prompt prefixes.
        prefixes: Vec<String>,
        /// The items.
        items: Vec<ChoiceItem>,
    },
}

impl Items {
    /// How many items.
    pub fn len(&self) -> usize {
        match self {
            Items::Gen { items, .. } => items.len(),
            Items::Choice { items, .. } => items.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The item ids, in order.
    pub fn ids(&self) -> Vec<String> {
        match self {
            Items::Gen { items, .. } => items.iter().map(|i| i.id.clone()).collect(),
            Items::Choice { items, .. } => items.iter().map(|i| i.id.clone()).collect(),
        }
    }
}

/// Why a task's items cannot be loaded or an answer cannot be scored.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No task of that name.
    #[error("unknown task `{0}` (tasks: gsm8k, humaneval, mmlu, openbookqa, nq-open, helm-mini, mc:FILE.jsonl, loss)")]
    Unknown(String),
    /// The data file cannot be read.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A record does not fit the task; `at` is `file:line`.
    #[error("{at}: {message}")]
    Item {
        /// Where the record is.
        at: String,
        /// What is wrong with it.
        message: String,
    },
    /// An answer cannot be scored.
    #[error("{0}")]
    Score(String),
}

/// A [`TaskError::Item`] at the place `at` names.
fn bad(at: &dyn Fn() -> String, message: impl Into<String>) -> TaskError {
    TaskError::Item {
        at: at(),
        message: message.into(),
    }
}

fn field<'a>(v: &'a Value, key: &str, at: &dyn Fn() -> String) -> Result<&'a str, TaskError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(at, format!("no text field `{key}`")))
}

fn records(path: &Path) -> Result<Vec<(usize, Value)>, TaskError> {
    Ok(json_records(path)?)
}

/// Loads `task`'s items from `root` (the data root), the first `limit` of them.
pub fn load(task: &Task, root: &Path, limit: Option<usize>) -> Result<Items, TaskError> {
    let take = limit.unwrap_or(usize::MAX);
    match task {
        Task::Gsm8k => gsm8k(&root.join("gsm8k/test.jsonl.gz"), take),
        Task::HumanEval => humaneval(&root.join("humaneval/HumanEval.jsonl.gz"), take),
        Task::Mmlu => mmlu(
            &root.join("mmlu/test.jsonl.gz"),
            &root.join("mmlu/dev.jsonl.gz"),
            take,
        ),
        Task::OpenBookQa => openbookqa(&root.join("openbookqa/test.jsonl.gz"), take),
        Task::NqOpen => nq_open(&root.join("nq-open/NQ-open.dev.jsonl.gz"), take),
        Task::Mc(path) => mc(path, take),
    }
}

/// The 8-shot prefix: exemplars as `Q: …\nA: …`, separated by blank lines.
/// Items continue it with `\n\nQ: …\nA:`, so the prefix ends on a token
/// boundary (a full stop) and its KV cache serves every item.
pub fn gsm8k_prefix() -> Result<String, TaskError> {
    let mut parts = Vec::new();
    for (i, line) in GSM8K_EXEMPLARS.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("gsm8k-cot-8shot.jsonl:{}", i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&at, e.to_string()))?;
        parts.push(format!(
            "Q: {}\nA: {}",
            field(&v, "question", &at)?,
            field(&v, "answer", &at)?
        ));
    }
    Ok(parts.join("\n\n"))
}

fn gsm8k(path: &Path, take: usize) -> Result<Items, TaskError> {
    let mut items = Vec::new();
    for (n, (line, v)) in records(path)?.into_iter().take(take).enumerate() {
        let at = || format!("{}:{line}", path.display());
        let gold = gsm8k_gold(field(&v, "answer", &at)?).map_err(|e| bad(&at, e.to_string()))?;
        items.push(GenItem {
            id: format!("gsm8k/{n}"),
            group: None,
            prefix: 0,
            text: format!("\n\nQ: {}\nA:", field(&v, "question", &at)?),
            gold: vec![gold],
            extra: BTreeMap::new(),
        });
    }
    Ok(Items::Gen {
        prefixes: vec![gsm8k_prefix()?],
        items,
        stop: GSM8K_STOP.iter().map(|s| s.to_string()).collect(),
        max_new_tokens: 256,
    })
}

fn humaneval(path: &Path, take: usize) -> Result<Items, TaskError> {
    let mut items = Vec::new();
    for (line, v) in records(path)?.into_iter().take(take) {
        let at = || format!("{}:{line}", path.display());
        let mut extra = BTreeMap::new();
        for key in ["test", "entry_point", "canonical_solution"] {
            extra.insert(key.to_string(), field(&v, key, &at)?.to_string());
        }
        items.push(GenItem {
            id: field(&v, "task_id", &at)?.to_string(),
            group: None,
            prefix: 0,
            text: field(&v, "prompt", &at)?.to_string(),
            gold: vec![],
            extra,
        });
    }
    Ok(Items::Gen {
        prefixes: vec![String::new()],
        items,
        stop: HUMANEVAL_STOP.iter().map(|s| s.to_string()).collect(),
        max_new_tokens: 384,
    })
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

fn mmlu_question(v: &Value, at: &dyn Fn() -> String) -> Result<(String, usize), TaskError> {
    let mut text = field(v, "question", at)?.trim().to_string();
    for l in LETTERS {
        text.push_str(&format!("\n{l}. {}", field(v, l, at)?.trim()));
    }
    text.push_str("\nAnswer:");
    let answer = field(v, "answer", at)?;
    let idx = LETTERS
        .iter()
        .position(|l| *l == answer.trim())
        .ok_or_else(|| bad(&at, format!("answer `{answer}` is not one of A, B, C, D")))?;
    Ok((text, idx))
}

fn mmlu(test: &Path, dev: &Path, take: usize) -> Result<Items, TaskError> {
    // Five dev exemplars per subject make its prefix.
    let mut shots: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (line, v) in records(dev)? {
        let at = || format!("{}:{line}", dev.display());
        let subject = field(&v, "subject", &at)?.to_string();
        let (q, a) = mmlu_question(&v, &at)?;
        let list = shots.entry(subject).or_default();
        if list.len() < 5 {
            list.push(format!("{q} {}", LETTERS[a]));
        }
    }
    let mut prefixes = Vec::new();
    let mut prefix_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut items = Vec::new();
    let mut per_subject: BTreeMap<String, usize> = BTreeMap::new();
    for (line, v) in records(test)?.into_iter().take(take) {
        let at = || format!("{}:{line}", test.display());
        let subject = field(&v, "subject", &at)?.to_string();
        let p = match prefix_of.get(&subject) {
            Some(&p) => p,
            None => {
                let exemplars = shots
                    .get(&subject)
                    .ok_or_else(|| bad(&at, format!("no dev exemplars for `{subject}`")))?;
                prefixes.push(format!(
                    "The following are multiple choice questions (with answers) about {}.\n\n{}",
                    subject.replace('_', " "),
                    exemplars.join("\n\n")
                ));
                prefix_of.insert(subject.clone(), prefixes.len() - 1);
                prefixes.len() - 1
            }
        };
        let (q, answer) = mmlu_question(&v, &at)?;
        let n = per_subject.entry(subject.clone()).or_default();
        items.push(ChoiceItem {
            id: format!("mmlu/{subject}/{n}"),
            group: Some(subject),
            prefix: p,
            context: format!("\n\n{q}"),
            choices: LETTERS.iter().map(|l| format!(" {l}")).collect(),
            labels: LETTERS.iter().map(|l| l.to_string()).collect(),
            answer,
        });
        *n += 1;
    }
    Ok(Items::Choice { prefixes, items })
}

/// A question with its choices, scored by each choice's text.
fn choice_item(
    id: String,
    question: &str,
    choices: Vec<String>,
    labels: Vec<String>,
    answer: usize,
) -> ChoiceItem {
    ChoiceItem {
        id,
        group: None,
        prefix: 0,
        context: format!("Question: {}\nAnswer:", question.trim()),
        choices: choices.iter().map(|c| format!(" {}", c.trim())).collect(),
        labels,
        answer,
    }
}

/// OpenBookQA in LLM-Adapters' instruction format: the choices are written
/// into the instruction as `Answer1: … Answer2: …`.
fn openbookqa(path: &Path, take: usize) -> Result<Items, TaskError> {
    let re = regex::Regex::new(
        r"(?s)^Please choose the correct answer to the question:\s*(.*?)\s*Answer1:\s*(.*?)\s*Answer2:\s*(.*?)\s*Answer3:\s*(.*?)\s*Answer4:\s*(.*?)\s*Answer format:",
    )
    .expect("a valid pattern");
    let mut items = Vec::new();
    for (n, (line, v)) in records(path)?.into_iter().take(take).enumerate() {
        let at = || format!("{}:{line}", path.display());
        let instruction = field(&v, "instruction", &at)?;
        let caps = re
            .captures(instruction)
            .ok_or_else(|| bad(&at, "the instruction does not list Answer1…Answer4"))?;
        let choices: Vec<String> = (2..=5).map(|i| caps[i].to_string()).collect();
        let labels: Vec<String> = (1..=4).map(|i| format!("answer{i}")).collect();
        let answer = field(&v, "answer", &at)?;
        let idx = labels
            .iter()
            .position(|l| l == answer.trim())
            .ok_or_else(|| bad(&at, format!("answer `{answer}` is not answer1…answer4")))?;
        items.push(choice_item(
            format!("openbookqa/{n}"),
            &caps[1],
            choices,
            labels,
            idx,
        ));
    }
    Ok(Items::Choice {
        prefixes: vec![String::new()],
        items,
    })
}

/// A file of one's own: `question`, `choices` (texts), `answer` (an index or one of the choices).
fn mc(path: &Path, take: usize) -> Result<Items, TaskError> {
    let mut items = Vec::new();
    for (n, (line, v)) in records(path)?.into_iter().take(take).enumerate() {
        let at = || format!("{}:{line}", path.display());
        let question = field(&v, "question", &at)?;
        let choices: Vec<String> = v
            .get("choices")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .filter(|c: &Vec<String>| c.len() >= 2)
            .ok_or_else(|| bad(&at, "`choices` must be an array of at least two texts"))?;
        let answer = match v.get("answer") {
            Some(Value::Number(i)) => i.as_u64().map(|i| i as usize),
            Some(Value::String(s)) => choices
                .iter()
                .position(|c| c == s)
                .or_else(|| s.parse::<usize>().ok())
                .or_else(|| {
                    // A letter: A, B, C, …
                    let c = s.trim().chars().next()?;
                    (s.trim().len() == 1 && c.is_ascii_uppercase())
                        .then(|| (c as u8 - b'A') as usize)
                }),
            _ => None,
        }
        .filter(|&i| i < choices.len())
        .ok_or_else(|| bad(&at, "`answer` must be a choice's index, letter or text"))?;
        let labels = (0..choices.len())
            .map(|i| ((b'A' + i as u8) as char).to_string())
            .collect();
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| format!("mc/{n}"));
        items.push(choice_item(id, question, choices, labels, answer));
    }
    Ok(Items::Choice {
        prefixes: vec![String::new()],
        items,
    })
}

fn nq_open(path: &Path, take: usize) -> Result<Items, TaskError> {
    let mut items = Vec::new();
    for (n, (line, v)) in records(path)?.into_iter().take(take).enumerate() {
        let at = || format!("{}:{line}", path.display());
        let golds: Vec<String> = v
            .get("answer")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .filter(|g: &Vec<String>| !g.is_empty())
            .ok_or_else(|| bad(&at, "`answer` must be a list of texts"))?;
        let q = field(&v, "question", &at)?.trim().trim_end_matches('?');
        items.push(GenItem {
            id: format!("nq-open/{n}"),
            group: None,
            prefix: 0,
            text: format!("\n\nQ: {q}?\nA:"),
            gold: golds,
            extra: BTreeMap::new(),
        });
    }
    Ok(Items::Gen {
        prefixes: vec!["Answer these questions:".to_string()],
        items,
        stop: NQ_STOP.iter().map(|s| s.to_string()).collect(),
        max_new_tokens: 32,
    })
}

fn detail(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn finish_name(g: &Generation) -> Value {
    serde_json::to_value(&g.finish).unwrap_or(Value::Null)
}

/// The item detail (and report figure) holding NQ-open's token F1.
pub const F1: &str = "f1";

/// Scores one generation item of `task`.
pub fn score(
    task: &Task,
    item: &GenItem,
    gens: &[Generation],
    limits: &Limits,
) -> Result<ItemResult, TaskError> {
    let first = gens
        .first()
        .ok_or_else(|| TaskError::Score("no generation to score".into()))?;
    match task {
        Task::Gsm8k => {
            let pred = gsm8k_answer(&first.text).unwrap_or_default();
            let ok = !pred.is_empty() && numbers_equal(&pred, &item.gold[0]);
            Ok(ItemResult {
                id: item.id.clone(),
                score: f64::from(u8::from(ok)),
                group: None,
                prediction: pred,
                gold: item.gold[0].clone(),
                detail: detail(&[
                    ("completion", Value::from(first.text.clone())),
                    ("finish", finish_name(first)),
                    ("tokens", Value::from(first.ids.len())),
                ]),
            })
        }
        Task::NqOpen => {
            let pred = first.text.trim().to_string();
            let ok = exact_match(&pred, &item.gold);
            let f1 = f1(&pred, &item.gold);
            Ok(ItemResult {
                id: item.id.clone(),
                score: f64::from(u8::from(ok)),
                group: None,
                prediction: pred,
                gold: item.gold.join(" | "),
                detail: detail(&[
                    ("tokens", Value::from(first.ids.len())),
                    (F1, Value::from(f1)),
                ]),
            })
        }
        Task::HumanEval => {
            let mut outcomes = Vec::new();
            for g in gens {
                let program = humaneval_program(item, &g.text);
                let outcome = run_python(&program, limits).map_err(|e| {
                    TaskError::Score(format!("cannot run python3 for {}: {e}", item.id))
                })?;
                outcomes.push(outcome);
            }
            let passed = outcomes.iter().filter(|o| o.passed()).count();
            let verdicts: Vec<Value> = outcomes
                .iter()
                .map(|o| match o {
                    Outcome::Passed => Value::from("passed"),
                    Outcome::TimedOut => Value::from("timed out"),
                    Outcome::Failed(m) => Value::from(format!("failed: {m}")),
                })
                .collect();
            Ok(ItemResult {
                id: item.id.clone(),
                score: pass_at_k(gens.len(), passed, 1),
                group: None,
                prediction: first.text.clone(),
                gold: item.extra["canonical_solution"].clone(),
                detail: detail(&[
                    ("samples", Value::from(gens.len())),
                    ("passed", Value::from(passed)),
                    ("verdicts", Value::from(verdicts)),
                    ("finish", finish_name(first)),
                ]),
            })
        }
        other => Err(TaskError::Score(format!(
            "{} is not a generation task",
            other.name()
        ))),
    }
}

/// The program HumanEval runs for a completion: prompt, completion, the
/// tests, and the call of `check` on the entry point.
pub fn humaneval_program(item: &GenItem, completion: &str) -> String {
    format!(
        "{}{}\n\n{}\n\ncheck({})\n",
        item.text, completion, item.extra["test"], item.extra["entry_point"]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
    }

    #[test]
    fn every_task_loads_its_published_item_count() {
        let root = shared();
        if !root.is_dir() {
            panic!("the shared data is missing at {}", root.display());
        }
        for (task, n) in [
            (Task::Gsm8k, 1319),
            (Task::HumanEval, 164),
            (Task::Mmlu, 14042),
            (Task::OpenBookQa, 500),
            (Task::NqOpen, 3610),
        ] {
            let items = load(&task, &root, None).unwrap();
            assert_eq!(items.len(), n, "{}", task.name());
        }
        // MMLU: 57 subjects, each with its own 5-shot prefix.
        let Items::Choice { prefixes, items } = load(&Task::Mmlu, &root, None).unwrap() else {
            panic!()
        };
        assert_eq!(prefixes.len(), 57);
        assert_eq!(prefixes[0].matches("\nAnswer: ").count(), 5);
        assert!(items.iter().all(|i| i.answer < 4));
    }

    #[test]
    fn the_gsm8k_prompt_is_eight_exemplars_then_the_question() {
        let prefix = gsm8k_prefix().unwrap();
        assert_eq!(prefix.matches("Q: ").count(), 8);
        assert!(prefix.ends_with("The answer is 8."));
        let Items::Gen { items, .. } = gsm8k(&shared().join("gsm8k/test.jsonl.gz"), 2).unwrap()
        else {
            panic!()
        };
        assert!(items[0].text.starts_with("\n\nQ: Janet"));
        assert_eq!(items[0].gold, ["18"]);
    }

    #[test]
    fn task_names_parse() {
        assert_eq!(Task::parse("nq-open").unwrap(), Task::NqOpen);
        assert_eq!(
            Task::parse("mc:my.jsonl").unwrap(),
            Task::Mc(PathBuf::from("my.jsonl"))
        );
        assert!(Task::parse("squad")
            .unwrap_err()
            .to_string()
            .contains("unknown task"));
    }

    #[test]
    fn own_multiple_choice_files_accept_index_letter_or_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.jsonl");
        std::fs::write(
            &path,
            "{\"question\": \"2+2?\", \"choices\": [\"3\", \"4\"], \"answer\": 1}\n\
             {\"question\": \"Sky?\", \"choices\": [\"blue\", \"green\"], \"answer\": \"A\"}\n\
             {\"question\": \"Sea?\", \"choices\": [\"wet\", \"dry\"], \"answer\": \"wet\"}\n",
        )
        .unwrap();
        let Items::Choice { items, .. } = mc(&path, usize::MAX).unwrap() else {
            panic!()
        };
        let answers: Vec<usize> = items.iter().map(|i| i.answer).collect();
        assert_eq!(answers, [1, 0, 0]);
        assert_eq!(items[0].context, "Question: 2+2?\nAnswer:");
        assert_eq!(items[0].choices, [" 3", " 4"]);
        std::fs::write(
            &path,
            "{\"question\": \"x\", \"choices\": [\"a\", \"b\"], \"answer\": 5}\n",
        )
        .unwrap();
        let e = mc(&path, usize::MAX).err().unwrap().to_string();
        assert!(e.contains("mine.jsonl:1") && e.contains("`answer`"), "{e}");
    }

    #[test]
    fn openbookqa_choices_come_out_of_the_instruction() {
        let Items::Choice { items, .. } =
            openbookqa(&shared().join("openbookqa/test.jsonl.gz"), 1).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            items[0].choices,
            [
                " make more phone calls",
                " quit eating lunch out",
                " buy less with monopoly money",
                " have lunch with friends"
            ]
        );
        assert_eq!(items[0].answer, 1);
        assert!(items[0].context.ends_with("save money is to\nAnswer:"));
    }

    fn humaneval_items() -> Vec<GenItem> {
        let Items::Gen { items, .. } =
            humaneval(&shared().join("humaneval/HumanEval.jsonl.gz"), usize::MAX).unwrap()
        else {
            panic!()
        };
        items
    }

    /// Runs `f` over the items on two threads (each sample is its own process).
    fn verdicts(items: &[GenItem], body: impl Fn(&GenItem) -> String + Sync) -> Vec<Outcome> {
        let limits = Limits::default();
        let half = items.len().div_ceil(2);
        std::thread::scope(|s| {
            let parts: Vec<_> = items
                .chunks(half)
                .map(|chunk| {
                    let body = &body;
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|i| run_python(&humaneval_program(i, &body(i)), &limits).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts.into_iter().flat_map(|p| p.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_canonical_humaneval_solution_passes_and_wrong_ones_fail() {
        assert!(
            super::super::sandbox::python_available(),
            "python3 is needed"
        );
        let items = humaneval_items();
        let good = verdicts(&items, |i| i.extra["canonical_solution"].clone());
        let failed: Vec<(&str, &Outcome)> = items
            .iter()
            .zip(&good)
            .filter(|(_, o)| !o.passed())
            .map(|(i, o)| (i.id.as_str(), o))
            .collect();
        assert!(failed.is_empty(), "canonical solutions failed: {failed:?}");
        // Wrong bodies: returning None fails every problem's tests.
        let bad = verdicts(&items, |_| "    return None\n".to_string());
        let passed: Vec<&str> = items
            .iter()
            .zip(&bad)
            .filter(|(_, o)| o.passed())
            .map(|(i, _)| i.id.as_str())
            .collect();
        assert!(passed.is_empty(), "wrong solutions passed: {passed:?}");
    }

    #[test]
    fn an_endless_completion_is_killed_at_the_time_limit() {
        let items = humaneval_items();
        let limits = Limits {
            timeout: std::time::Duration::from_secs(2),
            ..Limits::default()
        };
        let t = std::time::Instant::now();
        let outcome = run_python(
            &humaneval_program(&items[0], "    while True:\n        pass\n"),
            &limits,
        )
        .unwrap();
        assert_eq!(outcome, Outcome::TimedOut);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
