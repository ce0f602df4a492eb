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
