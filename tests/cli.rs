//! End-to-end tests of the `fedtune` binary.

use std::path::Path;
use std::process::{Command, Output};

fn fedtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the fedtune binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_trains_the_reference_course_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let o = fedtune(&[
        "run",
        "configs/least-squares.toml",
        "--set",
        "federate.rounds=6",
        "--set",
        "wire.quantization=int8",
        "--out",
        out_s,
        "--json",
    ]);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["rounds"], 6);
    let before = summary["initial_loss"]["test"].as_f64().unwrap();
    let after = summary["final_loss"]["test"].as_f64().unwrap();
    assert!(after < 0.1 * before, "{before} → {after}");
    assert!(summary["bytes_up"].as_u64().unwrap() > 0);
    for file in ["config.toml", "metrics.jsonl", "summary.json"] {
        assert!(out.join(file).is_file(), "{file} written");
    }
    let resolved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        resolved.contains("rounds = 6") && resolved.contains("quantization = \"int8\""),
        "{resolved}"
    );
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rounds = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "round")
        .count();
    assert_eq!(rounds, 6);
}

#[test]
fn a_mistyped_key_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[federate]\nrounds = 3\nsample_clinets = 2\n").unwrap();
    let o = fedtune(&["run", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("bad.toml:3: `federate.sample_clinets`: unknown field"),
        "{err}"
    );

    let o = fedtune(&[
        "run",
        "configs/least-squares.toml",
        "--set",
        "federate.rounds=many",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("--set federate.rounds=many: `federate.rounds`: invalid type"),
        "{}",
        text(&o.stderr)
    );

    let o = fedtune(&["run", "no/such/file.toml"]);
    assert!(
        text(&o.stderr).contains("cannot read config no/such/file.toml"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn a_lora_course_without_data_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("llm.toml");
    std::fs::write(&cfg, "[federate]\nrounds = 1\n[trainer]\nkind = \"lora\"\n").unwrap();
    let o = fedtune(&["run", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr)
            .contains("llm.toml: a LoRA course needs a [data] section with `name` or `path`"),
        "{}",
        text(&o.stderr)
    );
}

/// A server runs federated courses only: a local or global one is refused
/// before anything is written, naming the key.
#[test]
fn a_server_refuses_a_course_that_is_not_federated() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["local", "global"] {
        let out = dir.path().join(mode);
        let o = fedtune(&[
            "server",
            "configs/least-squares.toml",
            "--nats",
            "nats://127.0.0.1:9",
            "--set",
            &format!("federate.mode=\"{mode}\""),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        let e = text(&o.stderr);
        assert!(
            e.contains(
                "federate.mode in configs/least-squares.toml: a server runs federated courses"
            ),
            "{e}"
        );
        assert!(
            e.contains(&format!("run a {mode} course with `fedtune run`")),
            "{e}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn dry_run_prints_the_resolved_configuration() {
    let o = fedtune(&[
        "run",
        "configs/least-squares.toml",
        "--dry-run",
        "--set",
        "federate.seed=7",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let resolved: toml::Table = text(&o.stdout).parse().unwrap();
    assert_eq!(resolved["federate"]["seed"].as_integer(), Some(7));
    assert_eq!(
        resolved["wire"]["compression_level"].as_integer(),
        Some(1),
        "defaults are filled in"
    );
}

#[test]
fn bench_codec_reports_every_encoding() {
    let o = fedtune(&[
        "bench", "codec", "--params", "20000", "--reps", "1", "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.len(), 12, "4 quantizations × 3 compressions");
    let bytes = |q: &str, c: &str| {
        rows.iter()
            .find(|r| r["quantization"] == q && r["compression"] == c)
            .and_then(|r| r["bytes"].as_u64())
            .unwrap()
    };
    assert!(bytes("int8", "none") * 3 < bytes("none", "none"));
    assert!(bytes("f16", "none") * 3 < bytes("none", "none") * 2);
    assert_eq!(
        rows.iter().find(|r| r["quantization"] == "none").unwrap()["max_abs_error"],
        0.0
    );
}

#[test]
fn shipped_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs = [root.join("configs"), root.join("configs/strategies")];
    let entries = dirs.iter().flat_map(|d| std::fs::read_dir(d).unwrap());
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let o = fedtune(&["run", path.to_str().unwrap(), "--dry-run"]);
            assert!(
                o.status.success(),
                "{}: {}",
                path.display(),
                text(&o.stderr)
            );
        }
    }
}

#[test]
fn report_charts_a_run_and_writes_markdown() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = fedtune(&[
        "run",
        "configs/least-squares.toml",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = fedtune(&["report", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for chart in ["eval_loss.svg", "train_loss.svg", "bytes.svg"] {
        assert!(md.contains(&format!("](report/{chart})")), "{md}");
        let svg = std::fs::read_to_string(out.join("report").join(chart)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{chart}"
        );
    }
    // One line per client (5 in the reference course) in the training-loss chart.
    let train = std::fs::read_to_string(out.join("report/train_loss.svg")).unwrap();
    assert_eq!(train.matches("<polyline").count(), 5);
    let o = fedtune(&["report", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("is "), "{}", text(&o.stderr));
}

#[test]
fn a_shipped_aggregator_script_runs_the_reference_course() {
    let o = fedtune(&[
        "run",
        "configs/least-squares.toml",
        "--set",
        "aggregator.script=fedavgm",
        "--set",
        "aggregator.params.momentum=0.5",
        "--out",
        tempfile::tempdir()
            .unwrap()
            .path()
            .join("run")
            .to_str()
            .unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let before = summary["initial_loss"]["test"].as_f64().unwrap();
    let after = summary["final_loss"]["test"].as_f64().unwrap();
    assert!(after < 0.1 * before, "{before} → {after}");
}

#[test]
fn aggregator_script_errors_name_the_key_or_the_line() {
    let o = fedtune(&[
        "run",
        "configs/least-squares.toml",
        "--set",
        "aggregator.script=fedmagic",
        "--dry-run",
    ]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("aggregator.script") && err.contains("fedmagic") && err.contains("fedadam"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.rhai");
    std::fs::write(
        &bad,
        "fn aggregate(global, updates, round) {\n    global +\n}\n",
    )
    .unwrap();
    let set = format!("aggregator.script=\"{}\"", bad.display());
    let o = fedtune(&[
        "run",
        "configs/least-squares.toml",
        "--set",
        &set,
        "--dry-run",
    ]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains(&format!("{}:3:", bad.display())), "{err}");
}

#[test]
fn init_writes_a_course_whose_copied_scripts_are_the_ones_that_run() {
    let dir = tempfile::tempdir().unwrap();
    let course = dir.path().join("mine");
    let course_s = course.to_str().unwrap();
    let o = fedtune(&["init", course_s, "--template", "least-squares"]);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    let copy = course.join("scripts/aggregators/fedavg.rhai");
    assert!(text(&o.stdout).contains(copy.to_str().unwrap()));
    let config = course.join("config.toml");
    let run = |out: &str| -> serde_json::Value {
        let out = dir.path().join(out);
        let o = fedtune(&[
            "run",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "stderr: {}", text(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let learned = run("as-shipped");
    let before = learned["initial_loss"]["test"].as_f64().unwrap();
    assert!(learned["final_loss"]["test"].as_f64().unwrap() < 0.1 * before);
    // Edit the copy (this test runs from the checkout, whose own
    // scripts/aggregators/fedavg.rhai must not be the one taken): a strategy
    // that keeps the global parameters learns nothing.
    std::fs::write(&copy, "fn aggregate(global, updates, round) { global }\n").unwrap();
    let edited = run("edited");
    assert_eq!(edited["final_loss"]["test"].as_f64().unwrap(), before);
    // A second init does not write over the course.
    let again = fedtune(&["init", course_s]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("does not write over"),
        "{}",
        text(&again.stderr)
    );
    let bad = fedtune(&[
        "init",
        dir.path().join("x").to_str().unwrap(),
        "--template",
        "fedmagic",
    ]);
    assert!(
        text(&bad.stderr).contains("templates: quickstart"),
        "{}",
        text(&bad.stderr)
    );
}

#[test]
fn scripts_list_and_export_name_every_shipped_script() {
    let list = fedtune(&["scripts", "list"]);
    let listed = text(&list.stdout);
    for id in [
        "aggregators/fedadam",
        "hooks/fedprox",
        "pfl/ditto",
        "hpo/bo",
    ] {
        assert!(listed.contains(id), "{id} missing from:\n{listed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let ambiguous = fedtune(&[
        "scripts",
        "export",
        "scaffold",
        dir.path().to_str().unwrap(),
    ]);
    assert!(text(&ambiguous.stderr).contains("aggregators/scaffold or hooks/scaffold"));
    let o = fedtune(&[
        "scripts",
        "export",
        "hooks/scaffold",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let written = std::fs::read_to_string(dir.path().join("hooks/scaffold.rhai")).unwrap();
    assert_eq!(
        written,
        std::fs::read_to_string("adapters/scripts/hooks/scaffold.rhai").unwrap()
    );
}

#[test]
fn completions_cover_every_command_in_each_shell() {
    let o = fedtune(&["completions", "bash"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let bash = text(&o.stdout);
    assert!(
        bash.contains("_fedtune()") && bash.contains("complete -F _fedtune"),
        "{bash}"
    );
    for command in [
        "run", "server", "client", "eval", "bench", "hpo", "init", "secagg",
    ] {
        assert!(bash.contains(command), "bash completion lacks {command}");
    }
    let zsh = text(&fedtune(&["completions", "zsh"]).stdout);
    assert!(zsh.starts_with("#compdef fedtune"), "{zsh}");
    let fish = text(&fedtune(&["completions", "fish"]).stdout);
    assert!(fish.contains("complete -c fedtune"), "{fish}");
    let o = fedtune(&["completions", "tcsh"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("bash"),
        "the error lists the shells"
    );
}

/// `[model] compute` takes f32, bf16, int8 or auto; a wrong value, or bf16
/// or int8 with FedOT (which trains emulator layers in full), is refused by
/// key before any model loads.
#[test]
fn a_compute_setting_is_checked_by_key() {
    let dry = |sets: &[&str]| {
        let mut args = vec!["run", "configs/fed-gsm8k-3-fedot.toml", "--dry-run"];
        for s in sets {
            args.extend(["--set", s]);
        }
        fedtune(&args)
    };
    let o = dry(&["model.compute=\"fp8\""]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("model.compute") && err.contains("fp8"),
        "{err}"
    );
    for narrow in ["bf16", "int8"] {
        let o = dry(&[&format!("model.compute=\"{narrow}\"")]);
        assert!(!o.status.success());
        let err = text(&o.stderr);
        assert!(
            err.contains("model.compute") && err.contains("[offsite]"),
            "{narrow}: {err}"
        );
    }
    let o = fedtune(&[
        "run",
        "configs/quickstart.toml",
        "--dry-run",
        "--set",
        "model.compute=\"bf16\"",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("compute = \"bf16\""),
        "{}",
        text(&o.stdout)
    );
}

/// `[model] device` takes cpu, cuda or cuda:N, refused by key otherwise;
/// `--device` sets it. On a build without CUDA every command that would
/// use a GPU stops at once with the way to get one, before any data or
/// model is read (no panic deep in a course).
#[test]
fn a_device_setting_is_checked_by_key_and_fails_at_start_without_cuda() {
    let o = fedtune(&[
        "run",
        "configs/quickstart.toml",
        "--dry-run",
        "--set",
        "model.device=\"gpu\"",
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("model.device") && err.contains("gpu") && err.contains("cpu, cuda or cuda:N"),
        "{err}"
    );
    let o = fedtune(&[
        "run",
        "configs/quickstart.toml",
        "--dry-run",
        "--device",
        "cuda:1",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("device = \"cuda:1\""),
        "{}",
        text(&o.stdout)
    );
    // The default stays out of the resolved config (earlier runs keep their fingerprint).
    let o = fedtune(&["run", "configs/quickstart.toml", "--dry-run"]);
    assert!(!text(&o.stdout).contains("device ="), "{}", text(&o.stdout));
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let commands: [&[&str]; 5] = [
        &[
            "run",
            "configs/quickstart.toml",
            "--device",
            "cuda",
            "--out",
            out,
        ],
        &["eval", "gsm8k", "--limit", "1", "--device", "cuda:0"],
        &["bench", "train-step", "--device", "cuda"],
        &["generate", "--prompt", "hi", "--device", "cuda"],
        &[
            "bench",
            "generate",
            "--prompt-len",
            "8",
            "--no-prefix",
            "--device",
            "cuda",
        ],
    ];
    for args in commands {
        let started = std::time::Instant::now();
        let o = fedtune(args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            err.contains("built without CUDA") && err.contains("--features cuda"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("loading"),
            "{args:?}: {err}"
        );
        assert!(
            started.elapsed().as_secs() < 20,
            "{args:?} did not fail at start"
        );
    }
    assert!(
        !Path::new(out).exists(),
        "the run directory is not made for a run that cannot start"
    );
}
