//! `fedtune eval` on the real model: each task kind runs end to end, prints
//! its JSON result, writes per-item results, and an interrupted run resumes.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fedtune(args: &[&str]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .args(["--data-root", root.to_str().unwrap(), "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the fedtune binary runs")
}

fn eval(args: &[&str]) -> serde_json::Value {
    let o = fedtune(args);
    assert!(
        o.status.success(),
        "fedtune {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("the result is JSON")
}

#[test]
fn every_kind_of_task_runs_on_the_default_model_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    // Multiple choice: MMLU's first items, 5-shot per subject.
    let r = eval(&["eval", "mmlu", "--limit", "6", "--out", &out("mmlu.json")]);
    assert_eq!(
        (r["task"].as_str(), r["items"].as_u64()),
        (Some("mmlu"), Some(6))
    );
    let acc = r["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let full: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out("mmlu.json")).unwrap()).unwrap();
    assert_eq!(full["items"].as_array().unwrap().len(), 6);

    // Generation + sandbox: HumanEval, two problems, short completions.
    let r = eval(&[
        "eval",
        "humaneval",
        "--limit",
        "2",
        "--max-new-tokens",
        "24",
        "--out",
        &out("he.json"),
    ]);
    assert_eq!(r["items"].as_u64(), Some(2));
    assert!(r["generated_tokens"].as_u64().unwrap() > 0);

    // GSM8K: run 2 items, then ask for 3 with the same settings: the first two are kept.
    let args = |n: &'static str| {
        vec![
            "eval",
            "gsm8k",
            "--limit",
            n,
            "--max-new-tokens",
            "16",
            "--out",
        ]
    };
    let mut a = args("2");
    let p = out("gsm8k.json");
    a.push(&p);
    let first = eval(&a);
    assert_eq!(first["items"].as_u64(), Some(2));
    let mut a = args("3");
    a.push(&p);
    let second = eval(&a);
    assert_eq!(second["items"].as_u64(), Some(3));
    assert_eq!(second["resumed_items"].as_u64(), Some(2));

    // A different setting on the same results file is refused, not mixed in.
    let o = fedtune(&[
        "eval",
        "gsm8k",
        "--limit",
        "3",
        "--max-new-tokens",
        "17",
        "--out",
        &p,
    ]);
    assert!(!o.status.success());

    // Held-out loss of a course's split.
    let r = eval(&[
        "eval",
        "loss",
        "--config",
        "configs/quickstart.toml",
        "--limit",
        "4",
        "--out",
        &out("loss.json"),
    ]);
    let loss = r["score"].as_f64().unwrap();
    assert!(loss > 0.1 && loss < 10.0, "{loss}");
    assert!((r["extra"]["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
}

/// NQ-open (exact match, F1 beside it), OpenBookQA and helm-mini (their
/// mean with MMLU) end to end on the default model, as MMLU is above.
#[test]
fn nq_open_openbookqa_and_helm_mini_run_on_the_default_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let nq = eval(&[
        "eval",
        "nq-open",
        "--limit",
        "3",
        "--max-new-tokens",
        "8",
        "--out",
        &out("nq.json"),
    ]);
    assert_eq!(
        (nq["task"].as_str(), nq["items"].as_u64()),
        (Some("nq-open"), Some(3))
    );
    let (em, f1) = (
        nq["score"].as_f64().unwrap(),
        nq["extra"]["f1"].as_f64().unwrap(),
    );
    // An exact match has F1 1: F1 is never below exact match.
    assert!((0.0..=1.0).contains(&f1) && f1 >= em, "em {em}, f1 {f1}");
    let items: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out("nq.json")).unwrap()).unwrap();
    for item in items["items"].as_array().unwrap() {
        assert!(item["detail"]["f1"].as_f64().is_some(), "{item}");
    }

    let obqa = eval(&[
        "eval",
        "openbookqa",
        "--limit",
        "4",
        "--out",
        &out("obqa.json"),
    ]);
    assert_eq!(obqa["items"].as_u64(), Some(4));
    assert!((0.0..=1.0).contains(&obqa["score"].as_f64().unwrap()));

    let helm = eval(&[
        "eval",
        "helm-mini",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--out",
        &out("helm.json"),
    ]);
    let tasks: Vec<&str> = helm["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    assert_eq!(tasks, ["mmlu", "nq-open", "openbookqa"]);
    let mean = helm["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["score"].as_f64().unwrap())
        .sum::<f64>()
        / 3.0;
    assert!((helm["score"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert!(helm["note"].as_str().unwrap().contains("closed-book"));
}
