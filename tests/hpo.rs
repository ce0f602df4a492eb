//! `fedtune hpo` and `fedtune sweep` end to end: the numeric course for the
//! outputs and bad input, a tiny LLM for trials that continue their course
//! (exactly), local-mode trials, and a search killed and resumed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fedtune(args: &[&str]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let data_root: &[&str] = if args[0] == "model" {
        &[]
    } else {
        &["--data-root", root.to_str().unwrap()]
    };
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .args(data_root)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the fedtune binary runs")
}

fn ok(args: &[&str]) -> String {
    let o = fedtune(args);
    assert!(
        o.status.success(),
        "fedtune {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_search_writes_its_ledger_a_runnable_best_config_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("search");
    let o = out.to_str().unwrap();
    let args = [
        "hpo",
        "configs/least-squares.toml",
        "--space",
        "configs/hpo/least-squares.toml",
        "--method",
        "bo",
        "--trials",
        "8",
        "--budget-rounds",
        "6",
        "--out",
        o,
    ];
    ok(&args);
    let evals = lines(&out.join("trials.jsonl"));
    assert_eq!(evals.len(), 8);
    for e in &evals {
        let lr = e["config"]["least_squares.lr"].as_f64().unwrap();
        assert!((0.003..=0.3).contains(&lr), "{e}");
        assert_eq!(
            e["clients"].as_array().unwrap().len(),
            5,
            "per-client losses"
        );
    }
    let best = evals
        .iter()
        .min_by(|a, b| {
            a["objective"]
                .as_f64()
                .partial_cmp(&b["objective"].as_f64())
                .unwrap()
        })
        .unwrap();
    // best.toml runs the best configuration to the same loss.
    let run = out.join("best-run");
    let summary: serde_json::Value = serde_json::from_str(&ok(&[
        "run",
        out.join("best.toml").to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        summary["final_loss"]["test"].as_f64(),
        best["metrics"]["loss"].as_f64()
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("least_squares.lr") && report.contains("report/best-so-far.svg"));
    for svg in ["objective.svg", "best-so-far.svg"] {
        assert!(std::fs::read_to_string(out.join("report").join(svg))
            .unwrap()
            .starts_with("<svg"));
    }
    // The same --out again is refused; --resume runs nothing new.
    let again = fedtune(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let resumed = ok(&[&args[..], &["--resume"]].concat());
    assert!(resumed.contains("8 evaluations (0 run now"), "{resumed}");
    assert_eq!(lines(&out.join("trials.jsonl")).len(), 8);
}

#[test]
fn a_bad_space_is_refused_before_any_trial_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "least_squares.lrr = { uniform = [0.1, 0.2] }",
            "least_squares.lrr",
            "unknown field",
        ),
        (
            "least_squares.lr = { uniform = [0.2, 0.2] }",
            "least_squares.lr",
            "empty",
        ),
        (
            "least_squares.local_steps = { int = [0, 4] }",
            "least_squares.local_steps",
            "refuses 0",
        ),
        (
            "least_squares.lr = { choice = [] }",
            "least_squares.lr",
            "empty",
        ),
        (
            "federate.mode = { choice = [\"fed\", \"local\"] }",
            "federate.mode",
            "fed\" only",
        ),
    ];
    for (i, (text, key, says)) in cases.iter().enumerate() {
        let space = dir.path().join(format!("space{i}.toml"));
        std::fs::write(&space, text).unwrap();
        let out = dir.path().join(format!("out{i}"));
        let o = fedtune(&[
            "hpo",
            "configs/least-squares.toml",
            "--space",
            space.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{text}");
        assert!(
            err.contains(&format!("space{i}.toml: `{key}`")),
            "{text}: {err}"
        );
        assert!(err.contains(says), "{text}: {err}");
        assert!(!out.join("trials.jsonl").exists(), "{text}: no trial ran");
    }
}

#[test]
fn a_sweep_reports_mean_and_deviation_over_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let text = ok(&[
        "sweep",
        "configs/least-squares.toml",
        "--seeds",
        "3",
        "--set",
        "federate.rounds=4",
        "--out",
        out.to_str().unwrap(),
    ]);
    let evals = lines(&out.join("trials.jsonl"));
    let mut seeds: Vec<i64> = evals
        .iter()
        .map(|e| e["config"]["federate.seed"].as_i64().unwrap())
        .collect();
    seeds.sort();
    assert_eq!(seeds, [42, 43, 44], "federate.seed from the config's on");
    let losses: Vec<f64> = evals
        .iter()
        .map(|e| e["metrics"]["loss"].as_f64().unwrap())
        .collect();
    let mean = losses.iter().sum::<f64>() / 3.0;
    let sd = (losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    assert!(sd > 0.0, "the seeds change the course");
    let row = format!("| fed | 3 | {mean:.4} ± {sd:.4} |");
    assert!(text.contains(&row), "{row} in\n{text}");
    assert!(std::fs::read_to_string(out.join("sweep.md"))
        .unwrap()
        .contains(&row));
}

/// A tiny model, a 3-client LoRA course over it and a space, in `dir`.
fn tiny_course(dir: &Path) {
    let model = dir.join("model");
    ok(&["model", "tiny", "--out", model.to_str().unwrap()]);
    std::fs::write(
        dir.join("course.toml"),
        format!(
            "[federate]\nname = \"tiny-hpo\"\nrounds = 3\nclients = 3\nseed = 5\n\n\
             [model]\npath = {model:?}\n\n\
             [data]\nname = \"gsm8k\"\ntest_fraction = 0.1\nmax_tokens = 96\nlimit_per_client = 15\neval_limit = 4\n\n\
             [train]\nlocal_steps = 2\nbatch_size = 2\n\n\
             [optim]\nlr = 1e-2\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("space.toml"),
        "optim.lr = { log-uniform = [1e-3, 1e-1] }\nlora.lora_alpha = { int = [4, 32] }\nlora.lora_dropout = { uniform = [0.0, 0.2] }\n",
    )
    .unwrap();
}

/// `fedtune hpo` of the tiny course in `dir` into `dir/NAME`, with `args`.
fn tiny_hpo_args(dir: &Path, name: &str, args: &[&str]) -> Vec<String> {
    let path = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let mut all = vec![
        "hpo".to_string(),
        path("course.toml"),
        "--space".into(),
        path("space.toml"),
    ];
    all.extend(["--out".to_string(), path(name)]);
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

fn tiny_hpo(dir: &Path, name: &str, args: &[&str]) -> (PathBuf, String) {
    let all = tiny_hpo_args(dir, name, args);
    let text = ok(&all.iter().map(String::as_str).collect::<Vec<_>>());
    (dir.join(name), text)
}

#[test]
fn a_promoted_llm_trial_continues_its_course_exactly() {
    let dir = tempfile::tempdir().unwrap();
    tiny_course(dir.path());
    let (out, _) = tiny_hpo(
        dir.path(),
        "sha",
        &[
            "--method",
            "sha",
            "--trials",
            "3",
            "--budget-rounds",
            "3",
            // An [eval] task after every evaluation: the continued course's
            // results are its own, not the 1-round course's.
            "--set",
            r#"eval.tasks=["openbookqa"]"#,
            "--set",
            "eval.limit=3",
        ],
    );
    let evals = lines(&out.join("trials.jsonl"));
    assert_eq!(evals.len(), 4, "3 configurations at 1 round, the best at 3");
    assert!(evals.iter().all(|e| e.get("error").is_none()), "{evals:?}");
    let last = &evals[3];
    assert_eq!(last["rounds"].as_u64(), Some(3));
    let log = std::fs::read_to_string(out.join("hpo.log")).unwrap();
    assert!(
        log.contains("trial continues its course from round 1 to 3"),
        "{log}"
    );
    // The continued course ends where a fresh 3-round course of it does.
    let fresh = dir.path().join("fresh");
    let summary: serde_json::Value = serde_json::from_str(&ok(&[
        "run",
        out.join("best.toml").to_str().unwrap(),
        "--out",
        fresh.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        summary["test_loss_after"].as_f64(),
        last["metrics"]["loss"].as_f64()
    );
    assert_eq!(
        summary["eval"][0]["score"].as_f64(),
        last["metrics"]["openbookqa"].as_f64()
    );
}

#[test]
fn flora_fits_the_clients_local_losses_then_runs_one_federated_course() {
    let dir = tempfile::tempdir().unwrap();
    tiny_course(dir.path());
    // Two local trials at a time, on the one loaded model.
    let (out, _) = tiny_hpo(
        dir.path(),
        "flora",
        &[
            "--method",
            "flora",
            "--trials",
            "4",
            "--budget-rounds",
            "2",
            "--parallel",
            "2",
        ],
    );
    let evals = lines(&out.join("trials.jsonl"));
    assert_eq!(evals.len(), 5);
    let local: Vec<&serde_json::Value> = evals
        .iter()
        .filter(|e| e["config"].get("federate.mode").is_some())
        .collect();
    assert_eq!(local.len(), 4);
    for e in local {
        assert_eq!(e["config"]["federate.mode"].as_str(), Some("local"));
        assert_eq!(
            e["clients"].as_array().unwrap().len(),
            3,
            "each client's own loss"
        );
    }
    let last = evals.iter().max_by_key(|e| e["eval"].as_u64()).unwrap();
    assert!(last["config"].get("federate.mode").is_none());
    assert_eq!(last["rounds"].as_u64(), Some(2));
}

#[test]
fn a_killed_search_resumes_without_running_a_finished_trial_again() {
    let dir = tempfile::tempdir().unwrap();
    tiny_course(dir.path());
    let args = [
        "--method",
        "random",
        "--trials",
        "6",
        "--budget-rounds",
        "2",
    ];
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(tiny_hpo_args(dir.path(), "killed", &args))
        .args(["--data-root", root.to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ledger = dir.path().join("killed/trials.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while std::fs::read_to_string(&ledger).map_or(0, |t| t.lines().count()) < 2 {
        assert!(std::time::Instant::now() < deadline, "no trial finished");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = lines(&ledger);
    assert!(before.len() < 6, "killed before the end");
    let (_, text) = tiny_hpo(dir.path(), "killed", &[&args[..], &["--resume"]].concat());
    assert!(
        text.contains(&format!("6 evaluations ({} run now", 6 - before.len())),
        "{text}"
    );
    let after = lines(&ledger);
    assert_eq!(after.len(), 6, "each evaluation once");
    for b in &before {
        assert!(after.contains(b), "a finished evaluation is kept as it was");
    }
}

#[test]
fn the_best_configurations_are_rerun_over_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("top");
    let text = ok(&[
        "hpo",
        "configs/least-squares.toml",
        "--space",
        "configs/hpo/least-squares.toml",
        "--method",
        "random",
        "--trials",
        "5",
        "--budget-rounds",
        "3",
        "--top-k",
        "2",
        "--seeds",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let mut main = lines(&out.join("trials.jsonl"));
    main.sort_by(|a, b| {
        a["objective"]
            .as_f64()
            .partial_cmp(&b["objective"].as_f64())
            .unwrap()
    });
    let again = lines(&out.join("top-k/trials.jsonl"));
    assert_eq!(again.len(), 4);
    for best in &main[..2] {
        let mut seeds: Vec<i64> = again
            .iter()
            .filter(|e| e["config"]["least_squares.lr"] == best["config"]["least_squares.lr"])
            .map(|e| e["config"]["federate.seed"].as_i64().unwrap())
            .collect();
        seeds.sort();
        assert_eq!(seeds, [42, 43], "{best}");
        // The config's own seed gives the search's result again.
        let same = again
            .iter()
            .find(|e| {
                e["config"]["least_squares.lr"] == best["config"]["least_squares.lr"]
                    && e["config"]["federate.seed"] == 42
            })
            .unwrap();
        assert_eq!(same["metrics"]["loss"], best["metrics"]["loss"]);
    }
    assert!(text.contains("| 1 | least_squares.local_steps="), "{text}");
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("## The 2 best over 2 seeds"));
}
