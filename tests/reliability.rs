//! What a careless user or a hostile client can do to a course, through the
//! CLI: each case ends in time with a clear error, or is refused, and loses
//! nothing that was done.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `fedtune args`; fails the test if it takes longer than `limit`.
fn fedtune_within(limit: Duration, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the fedtune binary runs");
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "fedtune {args:?} still ran after {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A tiny random model and a 2-client LoRA course over it.
fn tiny_course(dir: &Path, extra: &str) -> PathBuf {
    let model = dir.join("model");
    let o = fedtune_within(
        Duration::from_secs(60),
        &["model", "tiny", "--out", model.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let config = dir.join("course.toml");
    std::fs::write(
        &config,
        format!(
            "[federate]\nname = \"tiny\"\nrounds = 2\nclients = 2\nseed = 3\n\n\
             [model]\npath = {model:?}\n\n\
             [data]\nname = \"gsm8k\"\ntest_fraction = 0.1\nmax_tokens = 96\nlimit_per_client = 12\neval_limit = 4\n\n\
             [train]\nlocal_steps = 3\nbatch_size = 2\n\n\
             {extra}\n"
        ),
    )
    .unwrap();
    config
}

#[test]
fn a_diverging_numeric_course_ends_with_a_clear_error_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = fedtune_within(
        Duration::from_secs(60),
        &[
            "run",
            "configs/least-squares.toml",
            "--set",
            "least_squares.lr=10",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("diverged at local step"), "{err}");
    assert!(err.contains("error: server: round "), "{err}");
    assert!(err.contains("federate.on_divergence"), "{err}");
}

#[test]
fn a_lora_course_whose_loss_explodes_names_the_client_round_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "[optim]\nlr = 1e30\n");
    let out = dir.path().join("run");
    let o = fedtune_within(
        Duration::from_secs(120),
        &[
            "run",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("training in round 1 failed"), "{err}");
    assert!(err.contains("at local step"), "{err}");
    // The same course going on without the failing clients fails only when none is left.
    let o = fedtune_within(
        Duration::from_secs(120),
        &[
            "run",
            config.to_str().unwrap(),
            "--set",
            "federate.on_divergence=\"skip-client\"",
            "--out",
            dir.path().join("run2").to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("no client delivered an update"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn retry_on_nan_loss_skips_a_non_finite_step_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // The second step of every fit gets a NaN term.
    let hook = dir.path().join("nan.rhai");
    std::fs::write(
        &hook,
        "fn on_batch_forward(ctx) { if ctx.step == 1 { ctx.add_loss(ctx.sq_norm() * (0.0 / 0.0)); } }\n",
    )
    .unwrap();
    let config = tiny_course(dir.path(), &format!("[hooks]\nscript = {hook:?}\n"));
    let run = |out: &str, retries: u32| {
        let retries = format!("train.retry_on_nan_loss={retries}");
        let out = dir.path().join(out);
        let o = fedtune_within(
            Duration::from_secs(120),
            &[
                "run",
                config.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--quiet",
                "--set",
                &retries,
            ],
        );
        (o, out)
    };
    let (o, _) = run("strict", 0);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("the gradient norm is NaN at local step 2 of 3"),
        "{err}"
    );
    let (o, out) = run("lenient", 1);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let records = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let skipped: Vec<f64> = records
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "train")
        .map(|r| r["extra"]["skipped_steps"].as_f64().unwrap_or(0.0))
        .collect();
    // 2 rounds × 2 clients, one skipped step each.
    assert_eq!(skipped, vec![1.0; 4], "{records}");
}

#[test]
fn settings_that_would_abort_the_process_are_refused_naming_the_key() {
    for (set, says) in [
        ("least_squares.dim=100000000", "least_squares.dim"),
        (
            "scripting.max_call_levels=1000000",
            "scripting.max_call_levels",
        ),
        ("scripting.max_operations=0", "scripting.max_operations"),
    ] {
        let o = fedtune_within(
            Duration::from_secs(30),
            &[
                "run",
                "configs/least-squares.toml",
                "--set",
                set,
                "--dry-run",
            ],
        );
        assert!(!o.status.success(), "{set} was accepted");
        let err = text(&o.stderr);
        assert!(err.contains(&format!("--set {set}")), "{set}: {err}");
        assert!(err.contains(says), "{set}: {err}");
    }
}

fn run_ls(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "configs/least-squares.toml",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    fedtune_within(Duration::from_secs(60), &args)
}

fn metrics_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count()
}

#[test]
fn a_run_directory_holds_one_run_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let first = run_ls(&out, &[]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let lines = metrics_lines(&out);
    assert!(!out.join(".lock").exists(), "the lock goes with the run");

    // Again into the same directory: refused, and nothing of the first run changes.
    let again = run_ls(&out, &[]);
    assert!(!again.status.success());
    let err = text(&again.stderr);
    assert!(
        err.contains("already holds a run") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        metrics_lines(&out),
        lines,
        "the earlier metrics are untouched"
    );

    // --overwrite replaces it: one run's records, not two.
    let replaced = run_ls(&out, &["--overwrite"]);
    assert!(replaced.status.success(), "{}", text(&replaced.stderr));
    assert_eq!(metrics_lines(&out), lines);

    // A live process holding the lock keeps everyone else out …
    std::fs::write(out.join(".lock"), std::process::id().to_string()).unwrap();
    let locked = run_ls(&out, &["--overwrite"]);
    assert!(!locked.status.success());
    let err = text(&locked.stderr);
    assert!(err.contains("in use by another fedtune run"), "{err}");
    // … a lock left by a process that is gone is taken over.
    std::fs::write(out.join(".lock"), "4000000000").unwrap();
    let stale = run_ls(&out, &["--overwrite"]);
    assert!(stale.status.success(), "{}", text(&stale.stderr));
}

#[test]
fn resume_refuses_fewer_rounds_than_its_checkpoints_hold() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "[optim]\nlr = 1e-3\n");
    let out = dir.path().join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--set",
            "federate.save_every=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        fedtune_within(Duration::from_secs(120), &refs)
    };
    let done = run(&["--set", "federate.rounds=3"]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    let summary = std::fs::read_to_string(out.join("summary.json")).unwrap();
    let fewer = run(&["--resume", "--set", "federate.rounds=2"]);
    assert!(!fewer.status.success());
    let err = text(&fewer.stderr);
    assert!(err.contains("already holds round 3"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("summary.json")).unwrap(),
        summary,
        "the finished run's records are untouched"
    );
    assert!(std::fs::read_to_string(out.join("config.toml"))
        .unwrap()
        .contains("rounds = 3"));
}

/// What two runs must agree on, record by record (timings aside; clients
/// of one round answer in whatever order they finish, so sorted).
fn comparable_records(dir: &Path) -> Vec<String> {
    let mut records: Vec<String> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{} {} {} {} {} {} {}",
                r["round"],
                r["event"],
                r["client"],
                r["split"],
                r["loss"],
                r["samples"],
                r["bytes_up"]
            )
        })
        .collect();
    records.sort();
    records
}

/// Runs `config` for 4 rounds straight and as 2 + 2 with `--resume`, and
/// asserts the two runs end with the same adapter bytes and records.
fn assert_resume_is_exact(dir: &Path, config: &Path, extra: &[&str]) {
    let run = |out: &Path, rounds: u32, resume: bool| {
        let rounds = format!("federate.rounds={rounds}");
        let mut args = vec![
            "run",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--set",
            &rounds,
            "--set",
            "federate.save_every=1",
            "--set",
            "train.local_steps=4",
        ];
        for set in extra {
            args.extend(["--set", set]);
        }
        if resume {
            args.push("--resume");
        }
        let o = fedtune_within(Duration::from_secs(120), &args);
        assert!(o.status.success(), "{}", text(&o.stderr));
    };
    let (full, part) = (dir.join("full"), dir.join("part"));
    run(&full, 4, false);
    run(&part, 2, false);
    run(&part, 4, true);
    let weights = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        weights(&full) == weights(&part),
        "the resumed adapter differs"
    );
    // The records too: nothing twice (round 2's evaluation ran again and
    // replaced the first), nothing missing. With pFL these hold the clients'
    // personal scores, so they also compare the personal adapters.
    assert_eq!(comparable_records(&part), comparable_records(&full));
}

#[test]
fn a_resumed_course_ends_bit_identical_to_an_uninterrupted_one_with_uneven_data() {
    let dir = tempfile::tempdir().unwrap();
    // 11 training examples per client in batches of 2 (6 batches) and 4 steps
    // a round: the clients' data positions wrap unevenly (0, 4, 2, 0, …).
    let config = tiny_course(dir.path(), "[optim]\nlr = 1e-2\n");
    assert_resume_is_exact(dir.path(), &config, &[]);
}

#[test]
fn a_resumed_course_restores_the_clients_optimizer_moments() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "[optim]\nlr = 1e-2\n");
    assert_resume_is_exact(dir.path(), &config, &["train.keep_optimizer_state=true"]);
}

/// Counts each client's fits in its `this` and trains later fits with a
/// smaller rate: a course that forgot the count trains differently.
const HOOK_WITH_STATE: &str = "fn on_fit_start(ctx) { this.fits = (this.fits ?? 0) + 1; }\n\
     fn on_batch_start(ctx) { ctx.set_lr(ctx.lr / this.fits); }\n";

#[test]
fn a_resumed_course_restores_personal_adapters_and_script_state() {
    let dir = tempfile::tempdir().unwrap();
    // Ditto's personal adapters live with the clients; the hook script keeps
    // a per-client counter in its state that changes the learning rate, so a
    // lost state changes the weights.
    let hook = dir.path().join("hook.rhai");
    std::fs::write(&hook, HOOK_WITH_STATE).unwrap();
    let extra = format!(
        "[optim]\nlr = 1e-2\n\n[pfl]\nalgorithm = \"ditto\"\nlambda = 0.5\n\n\
         [hooks]\nscript = {hook:?}\n"
    );
    let config = tiny_course(dir.path(), &extra);
    assert_resume_is_exact(dir.path(), &config, &["train.keep_optimizer_state=true"]);
}

#[test]
fn unclear_cases_get_what_the_config_says() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "[optim]\nlr = 1e-2\n");
    let model = dir.path().join("model");

    // `eval loss --config C` scores with C's own model, not the default one.
    let loss = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "eval",
            "loss",
            "--config",
            config.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = fedtune_within(Duration::from_secs(120), &args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        report["score"].as_f64().unwrap()
    };
    let out = dir.path().join("loss.json");
    let implied = loss(&["--out", out.to_str().unwrap()]);
    let explicit = loss(&[
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(implied, explicit);

    // A relative [model] path is found beside the config file, as scripts are.
    let text_of = std::fs::read_to_string(&config).unwrap();
    let relative = dir.path().join("relative.toml");
    std::fs::write(
        &relative,
        text_of.replace(&format!("path = {model:?}"), "path = \"model\""),
    )
    .unwrap();
    let o = fedtune_within(
        Duration::from_secs(120),
        &[
            "run",
            relative.to_str().unwrap(),
            "--out",
            dir.path().join("rel").to_str().unwrap(),
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));

    // ctx.stop() in on_fit_start: the fit takes no step, the adapter stays.
    let hook = dir.path().join("stop.rhai");
    std::fs::write(&hook, "fn on_fit_start(ctx) { ctx.stop(); }\n").unwrap();
    let o = fedtune_within(
        Duration::from_secs(120),
        &[
            "run",
            config.to_str().unwrap(),
            "--set",
            &format!("hooks.script={:?}", hook.to_str().unwrap()),
            "--out",
            dir.path().join("stopped").to_str().unwrap(),
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["test_loss_before"], summary["test_loss_after"]);
}

#[test]
fn skip_bad_records_skips_lines_that_are_not_utf8_and_the_run_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mine.jsonl");
    let mut bytes = Vec::new();
    for i in 0..30 {
        bytes.extend_from_slice(
            format!(
                "{{\"question\": \"What is {i} + 1?\", \"answer\": \"{i} + 1 = {}\\n#### {}\"}}\n",
                i + 1,
                i + 1
            )
            .as_bytes(),
        );
        if i == 7 {
            bytes.extend_from_slice(b"{\"question\": \"\xff\xfe\", \"answer\": \"#### 1\"}\n");
        }
    }
    std::fs::write(&data, bytes).unwrap();
    let config = tiny_course(dir.path(), "[optim]\nlr = 1e-2\n");
    let text_of = std::fs::read_to_string(&config).unwrap();
    let mine = dir.path().join("mine.toml");
    std::fs::write(
        &mine,
        text_of.replace(
            "name = \"gsm8k\"",
            &format!("path = {data:?}\nformat = \"gsm8k\"\nskip_bad_records = true"),
        ),
    )
    .unwrap();
    let o = fedtune_within(
        Duration::from_secs(120),
        &[
            "run",
            mine.to_str().unwrap(),
            "--out",
            dir.path().join("run").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("1 malformed records left out") && err.contains("line 9: not UTF-8"),
        "{err}"
    );
}

#[test]
fn an_interrupted_evaluation_resumes_only_with_the_same_adapter_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "[optim]\nlr = 1e-2\n");
    let model = dir.path().join("model");
    let train = |name: &str, seed: &str| -> PathBuf {
        let out = dir.path().join(name);
        let o = fedtune_within(
            Duration::from_secs(120),
            &[
                "run",
                config.to_str().unwrap(),
                "--set",
                &format!("federate.seed={seed}"),
                "--out",
                out.to_str().unwrap(),
                "--quiet",
            ],
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
        out.join("adapter")
    };
    let (a, b) = (train("a", "1"), train("b", "2"));
    let items = dir.path().join("mc.jsonl");
    std::fs::write(
        &items,
        (0..4)
            .map(|i| format!("{{\"question\": \"{i} plus one?\", \"choices\": [\"{}\", \"{}\"], \"answer\": 0}}\n", i + 1, i + 2))
            .collect::<String>(),
    )
    .unwrap();
    let task = format!("mc:{}", items.display());
    let results = dir.path().join("mc.json");
    let eval = |adapter: &Path, limit: &str| {
        fedtune_within(
            Duration::from_secs(120),
            &[
                "eval",
                &task,
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--limit",
                limit,
                "--out",
                results.to_str().unwrap(),
                "--quiet",
            ],
        )
    };
    assert!(eval(&a, "2").status.success());
    // The same adapter's bytes elsewhere: the two finished items are kept.
    let moved = dir.path().join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    for f in std::fs::read_dir(&a).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, moved.join(f.file_name().unwrap())).unwrap();
        }
    }
    let o = eval(&moved, "3");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["resumed_items"], 2);
    // Other bytes at the same path: refused, not mixed in.
    for f in std::fs::read_dir(&b).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, moved.join(f.file_name().unwrap())).unwrap();
        }
    }
    let o = eval(&moved, "4");
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("another evaluation"),
        "{}",
        text(&o.stderr)
    );
}
