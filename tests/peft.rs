//! Every PEFT method through the CLI on a tiny model: a course trains it,
//! writes it in PEFT's layout, and `fedtune eval loss` reloads it to the
//! course's own final test loss; over NATS it ends where it does in process.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fedtune(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("fedtune runs");
    assert!(
        out.status.success(),
        "fedtune {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tiny_course(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    fedtune(&["model", "tiny", "--out", model.to_str().unwrap()]);
    let config = dir.join("course.toml");
    std::fs::write(
        &config,
        format!(
            "[federate]\nname = \"tiny-peft\"\nrounds = 2\nclients = 2\nseed = 5\n\n\
             [model]\npath = {model:?}\n\n\
             [data]\nname = \"gsm8k\"\ntest_fraction = 0.1\nmax_tokens = 96\nlimit_per_client = 16\neval_limit = 4\n\n\
             [prompt]\nnum_virtual_tokens = 6\nencoder_hidden_size = 16\n\n\
             [train]\nlocal_steps = 2\nbatch_size = 2\n\n\
             [optim]\nlr = 1e-2\n"
        ),
    )
    .unwrap();
    config
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `fedtune eval loss` of `adapter` on `model` over the course's test split.
fn eval_loss(config: &Path, adapter: &Path, model: &Path) -> f64 {
    let report: serde_json::Value = serde_json::from_str(&fedtune(&[
        "eval",
        "loss",
        "--config",
        config.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--quiet",
    ]))
    .unwrap();
    report["score"].as_f64().unwrap()
}

#[test]
fn every_method_trains_saves_in_peft_layout_and_reloads_to_its_final_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    let model = dir.path().join("model");
    for (kind, extra, peft_type) in [
        ("lora", "", "LORA"),
        ("prompt", "", "PROMPT_TUNING"),
        ("prompt", "prompt.init=text", "PROMPT_TUNING"),
        ("p-tuning", "", "P_TUNING"),
        ("prefix", "", "PREFIX_TUNING"),
        ("prefix", "prompt.prefix_projection=true", "PREFIX_TUNING"),
    ] {
        let out = dir.path().join(format!("{kind}{}", extra.len()));
        let mut args = vec![
            "run".to_string(),
            config.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--quiet".into(),
            "--set".into(),
            format!("adapter.kind={kind}"),
        ];
        if !extra.is_empty() {
            args.extend(["--set".to_string(), extra.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fedtune(&args);
        let adapter = out.join("adapter");
        let cfg = json(&adapter.join("adapter_config.json"));
        assert_eq!(cfg["peft_type"], peft_type, "{kind} {extra}");
        assert!(adapter.join("adapter_model.safetensors").is_file());
        if extra == "prompt.init=text" {
            // "Think step by step." is 19 bytes, one token each.
            assert_eq!(cfg["num_virtual_tokens"], 19);
        }
        let after = json(&out.join("summary.json"))["test_loss_after"]
            .as_f64()
            .unwrap();
        let reloaded = eval_loss(&config, &adapter, &model);
        assert!(
            (reloaded - after).abs() < 1e-4,
            "{kind} {extra}: reloaded {reloaded} vs course {after}"
        );
        // Generation (8-shot GSM8K, a shared cached prefix) runs with it too.
        let results = out.join("gsm8k.jsonl");
        let report: serde_json::Value = serde_json::from_str(&fedtune(&[
            "eval",
            "gsm8k",
            "--limit",
            "2",
            "--batch",
            "2",
            "--max-new-tokens",
            "4",
            "--adapter",
            adapter.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--out",
            results.to_str().unwrap(),
            "--quiet",
        ]))
        .unwrap();
        assert_eq!(report["items"], 2, "{kind} {extra}: {report}");
    }
}

#[test]
fn a_prefix_course_over_nats_ends_with_the_in_process_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    let run = |transport: &str| -> PathBuf {
        let out = dir.path().join(transport);
        fedtune(&[
            "run",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--set",
            "adapter.kind=prefix",
            "--set",
            &format!("broker.transport={transport}"),
        ]);
        out.join("adapter").join("fedtune_trainable.safetensors")
    };
    let a = std::fs::read(run("in-process")).unwrap();
    let b = std::fs::read(run("nats")).unwrap();
    assert!(a == b, "the trainable tensors differ");
}

/// FedOT over NATS: a spy subscribed as client 1 sees what the server sends
/// it. The base model is the emulator — its four layers are the full
/// model's layers 0, 1, 3 and 5, and nothing of the dropped layers 2 and 4
/// is in it — and the course still ends with client 1 trained on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fedot_client_receives_the_emulator_and_never_the_dropped_layers() {
    use fedtune_kernel::{decode, DecodeLimits, MsgKind, Party, Transport};
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    let model = dir.path().join("model6");
    fedtune(&[
        "model",
        "tiny",
        "--out",
        model.to_str().unwrap(),
        "--layers",
        "6",
    ]);
    let nats = fedtune_broker::LocalNats::start(None).unwrap();
    let spy = fedtune_broker::NatsTransport::connect(
        &nats.url(),
        "tiny-peft",
        fedtune_broker::NatsOptions::default(),
    )
    .await
    .unwrap();
    let mut inbox = spy.subscribe(Party::Client(1)).await.unwrap();
    let sets = [
        format!("model.path={}", model.display()),
        "offsite.enabled=true".into(),
        "offsite.emu_l=1".into(),
        "offsite.emu_r=1".into(),
        "offsite.drop_ratio=0.5".into(),
    ];
    let spawn = |role: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fedtune"));
        c.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(role)
            .arg(&config)
            .args(["--nats", &nats.url()]);
        for s in &sets {
            c.args(["--set", s]);
        }
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let out = dir.path().join("server");
    let mut server = spawn(&["server", "--quiet", "--out", out.to_str().unwrap()]);
    let mut clients: Vec<_> = (1..=2)
        .map(|id| spawn(&["client", "--id", &id.to_string()]))
        .collect();
    let base = loop {
        let d = tokio::time::timeout(std::time::Duration::from_secs(60), inbox.recv())
            .await
            .expect("a message for client 1")
            .expect("the subscription is open");
        let env = decode(&d.frame, &DecodeLimits::default()).unwrap();
        if env.kind == MsgKind::BaseModel {
            break env;
        }
    };
    assert!(server.wait().unwrap().success());
    for c in clients.iter_mut() {
        assert!(c.wait().unwrap().success());
    }
    let weights = base.payload.unwrap();
    let layers: std::collections::BTreeSet<String> = weights
        .names()
        .filter_map(|n| n.strip_prefix("model.layers."))
        .filter_map(|n| n.split('.').next())
        .map(String::from)
        .collect();
    assert_eq!(layers.into_iter().collect::<Vec<_>>(), ["0", "1", "2", "3"]);
    assert_eq!(base.meta["kept_layers"], serde_json::json!([0, 1, 3, 5]));
    // Every weight of the message is the full model's kept layer's, and none is a dropped one's.
    let full = fedtune_adapters::model::load_hf_dir(
        &model,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .model;
    let full: std::collections::HashMap<String, Vec<f32>> = full
        .named_weights()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    for (emu, orig) in [(0, 0), (1, 1), (2, 3), (3, 5)] {
        let name = |l: usize| format!("model.layers.{l}.self_attn.q_proj.weight");
        let sent = weights.get(&name(emu)).unwrap().data();
        assert_eq!(sent, &full[&name(orig)][..], "emulator layer {emu}");
        for dropped in [2, 4] {
            assert_ne!(sent, &full[&name(dropped)][..]);
        }
    }
    assert!(out
        .join("adapter-emulator/adapter_model.safetensors")
        .is_file());
    let plugged = json(&out.join("adapter/adapter_config.json"));
    assert_eq!(plugged["layers_to_transform"], serde_json::json!([0, 5]));
}

#[test]
fn fedot_in_process_aligns_the_emulator_and_reports_the_full_models_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    let model = dir.path().join("model6");
    fedtune(&[
        "model",
        "tiny",
        "--out",
        model.to_str().unwrap(),
        "--layers",
        "6",
    ]);
    let out = dir.path().join("fedot");
    let saved = dir.path().join("emulator");
    let emulator_path = format!("offsite.emulator_path={}", saved.display());
    fedtune(&[
        "run",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--set",
        &emulator_path,
        "--set",
        &format!("model.path={}", model.display()),
        "--set",
        "offsite.enabled=true",
        "--set",
        "offsite.emu_l=1",
        "--set",
        "offsite.emu_r=1",
        "--set",
        "offsite.distill_steps=10",
        "--set",
        "offsite.distill_examples=20",
        "--set",
        "offsite.distill_lr=1e-3",
        "--set",
        "eval.tasks=[\"loss\"]",
    ]);
    let summary = json(&out.join("summary.json"));
    let o = &summary["offsite"];
    assert_eq!(o["kept_layers"], serde_json::json!([0, 1, 3, 5]));
    let d = &o["distilled"];
    assert!(
        d["kl_after"].as_f64().unwrap() < d["kl_before"].as_f64().unwrap(),
        "{d}"
    );
    assert!(o["test_loss_full_model"].as_f64().unwrap().is_finite());
    // The plugged-in adapter is the full model's: `fedtune eval` reproduces its loss.
    let full = o["test_loss_full_model"].as_f64().unwrap();
    assert!((eval_loss(&config, &out.join("adapter"), &model) - full).abs() < 1e-4);
    // So does the course's own [eval], on the full model it loaded.
    let at_end = summary["eval"][0]["score"].as_f64().unwrap();
    assert!((at_end - full).abs() < 1e-4, "[eval] {at_end} vs {full}");

    // The aligned emulator was saved: a second course reuses it (no second
    // alignment) and ends exactly where the first did.
    assert!(saved.join("emulator.safetensors").is_file());
    let again = dir.path().join("fedot-again");
    let rerun = |out: &Path, extra: &str| {
        Command::new(env!("CARGO_BIN_EXE_fedtune"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "run",
                config.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(["--set", &emulator_path, "--set"])
            .arg(format!("model.path={}", model.display()))
            .args(["--set", "offsite.enabled=true", "--set", "offsite.emu_l=1"])
            .args([
                "--set",
                "offsite.emu_r=1",
                "--set",
                "offsite.distill_steps=10",
            ])
            .args(["--set", "offsite.distill_examples=20", "--set"])
            .args(["offsite.distill_lr=1e-3", "--set", "eval.tasks=[\"loss\"]"])
            .args(["--set", extra])
            .output()
            .unwrap()
    };
    let o = rerun(&again, "offsite.drop_ratio=0.5");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("reusing the emulator saved in"), "{said}");
    assert!(!said.contains("aligning the emulator"), "{said}");
    let second = json(&again.join("summary.json"));
    assert_eq!(second["offsite"], summary["offsite"]);
    assert!(summary["test_loss_after"].is_f64());
    assert_eq!(second["test_loss_after"], summary["test_loss_after"]);
    // Other settings on the same directory are refused, naming the change.
    let o = rerun(&dir.path().join("fedot-other"), "offsite.drop_ratio=0.2");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("offsite.drop_ratio: saved 0.5, now 0.2"), "{e}");
}
