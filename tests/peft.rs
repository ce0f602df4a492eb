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

/// A course summary's held-out loss before and after training.
fn losses(summary: &serde_json::Value) -> (f64, f64) {
    (
        summary["test_loss_before"].as_f64().unwrap(),
        summary["test_loss_after"].as_f64().unwrap(),
    )
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

/// `fedtune eval gsm8k` on two items with `adapter` (8-shot, batched over a
/// shared cached prefix): the report.
fn eval_gsm8k(adapter: &Path, model: &Path, new_tokens: usize) -> serde_json::Value {
    let results = adapter.with_file_name("gsm8k.jsonl");
    serde_json::from_str(&fedtune(&[
        "eval",
        "gsm8k",
        "--limit",
        "2",
        "--batch",
        "2",
        "--max-new-tokens",
        &new_tokens.to_string(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--out",
        results.to_str().unwrap(),
        "--quiet",
    ]))
    .unwrap()
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
        let report = eval_gsm8k(&adapter, &model, 4);
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
    let model = six_layer_model(dir.path());
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

/// `dir/model6`, a six-layer tiny model, made on first use.
fn six_layer_model(dir: &Path) -> PathBuf {
    let model = dir.join("model6");
    if !model.exists() {
        fedtune(&[
            "model",
            "tiny",
            "--out",
            model.to_str().unwrap(),
            "--layers",
            "6",
        ]);
    }
    model
}

/// A FedOT course of `config` on [`six_layer_model`]: the emulator keeps
/// layers 0, 1, 3 and 5 (`emu_l = emu_r = 1`) and the loss is evaluated at
/// the end; `extra` overrides more.
fn fedot(dir: &Path, config: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let model = six_layer_model(dir);
    let model_path = format!("model.path={}", model.display());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedtune"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("run")
        .arg(config)
        .arg("--out")
        .arg(out);
    let common = [
        model_path.as_str(),
        "offsite.enabled=true",
        "offsite.emu_l=1",
        "offsite.emu_r=1",
        "eval.tasks=[\"loss\"]",
    ];
    for set in common.iter().chain(extra) {
        cmd.args(["--set", set]);
    }
    cmd.output().unwrap()
}

/// [`fedot`], which must succeed.
fn fedot_ok(dir: &Path, config: &Path, out: &Path, extra: &[&str]) {
    let o = fedot(dir, config, out, extra);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn fedot_in_process_aligns_the_emulator_and_reports_the_full_models_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    let model = dir.path().join("model6");
    let out = dir.path().join("fedot");
    let saved = dir.path().join("emulator");
    let emulator_path = format!("offsite.emulator_path={}", saved.display());
    let aligned = [
        emulator_path.as_str(),
        "offsite.distill_steps=10",
        "offsite.distill_examples=20",
        "offsite.distill_lr=1e-3",
    ];
    fedot_ok(dir.path(), &config, &out, &aligned);
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
    // `fedtune eval --emulator` scores the emulator with the clients'
    // adapter, as the course did at its end (FS-LLM's eval_type "emu"); the
    // full model's loss differs.
    let on_emulator = |model: &Path| {
        Command::new(env!("CARGO_BIN_EXE_fedtune"))
            .args(["eval", "loss", "--quiet", "--config"])
            .arg(&config)
            .arg("--emulator")
            .arg(&saved)
            .arg("--adapter")
            .arg(out.join("adapter-emulator"))
            .arg("--model")
            .arg(model)
            .arg("--out")
            .arg(dir.path().join("eval-emulator.json"))
            .output()
            .unwrap()
    };
    let o = on_emulator(&model);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let emu_loss = report["score"].as_f64().unwrap();
    let course_loss = summary["test_loss_after"].as_f64().unwrap();
    assert!(
        (emu_loss - course_loss).abs() < 1e-4,
        "{emu_loss} vs {course_loss}"
    );
    assert!((emu_loss - full).abs() > 1e-3, "{emu_loss} vs {full}");
    // Another full model (another tokenizer, perhaps) is refused.
    let o = on_emulator(&dir.path().join("model"));
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("the emulator was made from another model"),
        "{e}"
    );
    let again = dir.path().join("fedot-again");
    let rerun = |out: &Path, extra: &str| {
        let mut sets = aligned.to_vec();
        sets.push(extra);
        fedot(dir.path(), &config, out, &sets)
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

/// LocalOT (FS-LLM's baseline for FedOT): each client tunes the emulator on
/// its own data alone; each one's adapter is plugged into the full model and
/// scored there on that client's own test split.
#[test]
fn local_offsite_tuning_plugs_each_clients_adapter_into_the_full_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    let out = dir.path().join("localot");
    fedot_ok(dir.path(), &config, &out, &["federate.mode=\"local\""]);
    let summary = json(&out.join("summary.json"));
    let o = &summary["offsite"];
    assert_eq!(o["kept_layers"], serde_json::json!([0, 1, 3, 5]));
    let each = o["clients_test_loss_full_model"].as_object().unwrap();
    assert_eq!(each.len(), 2, "{o}");
    let mut losses = Vec::new();
    for c in summary["per_client"].as_array().unwrap() {
        let id = c["id"].as_u64().unwrap();
        for sub in ["adapter", "adapter-emulator"] {
            let f = out.join(format!("{sub}/client-{id}/adapter_model.safetensors"));
            assert!(f.is_file(), "{}", f.display());
        }
        let plugged = json(&out.join(format!("adapter/client-{id}/adapter_config.json")));
        assert_eq!(plugged["layers_to_transform"], serde_json::json!([0, 5]));
        // The course's own [eval] loads the saved full-model adapter and
        // scores it on the client's own group: the same loss.
        let full = each[&id.to_string()].as_f64().unwrap();
        let scored = c["own_adapter_eval"]["loss:test"].as_f64().unwrap();
        assert!(
            (full - scored).abs() < 1e-4,
            "client {id}: {full} vs {scored}"
        );
        // The course's losses are the emulator's.
        let on_emulator = c["test_loss_after"].as_f64().unwrap();
        assert!((full - on_emulator).abs() > 1e-3, "client {id}");
        losses.push(full);
    }
    assert!((losses[0] - losses[1]).abs() > 1e-6, "{losses:?}");
    let mean = o["test_loss_full_model"].as_f64().unwrap();
    let (lo, hi) = (losses[0].min(losses[1]), losses[0].max(losses[1]));
    assert!(lo <= mean && mean <= hi, "{mean} outside {losses:?}");

    // The global scenario: one adapter, on everyone's data, plugged in as FedOT's is.
    let out = dir.path().join("globalot");
    fedot_ok(dir.path(), &config, &out, &["federate.mode=\"global\""]);
    let o = &json(&out.join("summary.json"))["offsite"];
    assert!(out
        .join("adapter-emulator/adapter_model.safetensors")
        .is_file());
    let full = o["test_loss_full_model"].as_f64().unwrap();
    let model = dir.path().join("model6");
    assert!((eval_loss(&config, &out.join("adapter"), &model) - full).abs() < 1e-4);
}

/// FedOT as offsite-tuning trains it: the emulator's adapter layers in full
/// (`offsite.tune = "full"`), plugged back into the full model's first and
/// last layers.
#[test]
fn fedot_can_train_the_adapter_layers_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    let model = dir.path().join("model6");
    let out = dir.path().join("full");
    fedot_ok(
        dir.path(),
        &config,
        &out,
        &["offsite.tune=\"full\"", "optim.lr=1e-4"],
    );
    let summary = json(&out.join("summary.json"));
    let o = &summary["offsite"];
    assert_eq!(o["kept_layers"], serde_json::json!([0, 1, 3, 5]));
    // The whole of two layers of the tiny model (hidden 64, two key/value
    // heads of 16, MLP 128): q, o 64·64; k, v 32·64; gate, up, down 128·64;
    // the two norms 64 each.
    let per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64;
    assert_eq!(o["trainable_params"], serde_json::json!(2 * per_layer));
    let emu = json(&out.join("adapter-emulator/adapter_config.json"));
    assert_eq!(emu["peft_type"], "FEDTUNE_FULL");
    assert_eq!(emu["norms"], true);
    let tensors = candle_core::safetensors::load(
        out.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let norm = &tensors["base_model.model.model.layers.5.post_attention_layernorm.delta"];
    let moved = norm.abs().unwrap().max_all().unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 0.0,
        "the norms trained (and were renumbered into the full model)"
    );
    assert_eq!(emu["layers_to_transform"], serde_json::json!([0, 3]));
    let plugged = json(&out.join("adapter/adapter_config.json"));
    assert_eq!(plugged["layers_to_transform"], serde_json::json!([0, 5]));
    // It trained: the emulator's loss fell.
    let (before, after) = losses(&summary);
    assert!(after < before, "{before} -> {after}");
    // The saved full-model adapter loads back to the loss the course measured.
    let full = o["test_loss_full_model"].as_f64().unwrap();
    assert!((eval_loss(&config, &out.join("adapter"), &model) - full).abs() < 1e-4);
    assert!((full - o["test_loss_full_model_base"].as_f64().unwrap()).abs() > 1e-6);
}

/// A LoRA course on a tiny model of each family besides Llama's — Mistral
/// (its sliding window shorter than the sequences), Qwen2 (query, key and
/// value biases) and Gemma — lowers the test loss, saves a PEFT adapter that `fedtune
/// eval loss` reloads to the course's final loss, and generates through the
/// KV cache.
#[test]
fn a_lora_course_runs_on_every_model_family() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    for family in ["mistral", "qwen2", "gemma"] {
        let model = dir.path().join(format!("model-{family}"));
        fedtune(&[
            "model",
            "tiny",
            "--family",
            family,
            "--out",
            model.to_str().unwrap(),
        ]);
        assert_eq!(json(&model.join("config.json"))["model_type"], family);
        let out = dir.path().join(format!("lora-{family}"));
        fedtune(&[
            "run",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
            "--set",
            &format!("model.path={:?}", model.display().to_string()),
            "--set",
            "lora.target_modules=[\"q_proj\",\"k_proj\",\"v_proj\",\"o_proj\"]",
        ]);
        let (before, after) = losses(&json(&out.join("summary.json")));
        assert!(after < before, "{family}: {before} -> {after}");
        let adapter = out.join("adapter");
        let reloaded = eval_loss(&config, &adapter, &model);
        assert!(
            (reloaded - after).abs() < 1e-4,
            "{family}: reloaded {reloaded} vs course {after}"
        );
        let report = eval_gsm8k(&adapter, &model, 8);
        assert_eq!(report["items"], 2, "{family}: {report}");
    }
}

/// A FedEx-LoRA course saves its residual beside the PEFT factors; the
/// adapter reloads to the course's own loss, and without its residual file
/// it is refused, naming the file, rather than evaluated as something else.
#[test]
fn a_fedex_lora_adapter_reloads_with_its_residual() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[lora]\nresidual = true\n\n[aggregator]\nscript = \"fedex_lora\"\n");
    std::fs::write(&config, text).unwrap();
    let out = dir.path().join("fedex");
    fedtune(&[
        "run",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let (before, after) = losses(&json(&out.join("summary.json")));
    assert!(after < before, "{before} -> {after}");
    let adapter = out.join("adapter");
    assert_eq!(
        json(&adapter.join("adapter_config.json"))["fedtune_residual"],
        true
    );
    let model = dir.path().join("model");
    let reloaded = eval_loss(&config, &adapter, &model);
    assert!(
        (reloaded - after).abs() < 1e-4,
        "reloaded {reloaded} vs course {after}"
    );
    // The residual matters: the factors alone (as PEFT would load them) are another model.
    let factors_only = dir.path().join("factors-only");
    std::fs::create_dir(&factors_only).unwrap();
    let mut cfg = json(&adapter.join("adapter_config.json"));
    cfg.as_object_mut().unwrap().remove("fedtune_residual");
    std::fs::write(factors_only.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        adapter.join("adapter_model.safetensors"),
        factors_only.join("adapter_model.safetensors"),
    )
    .unwrap();
    let without = eval_loss(&config, &factors_only, &model);
    assert!(
        (without - after).abs() > 1e-3,
        "without the residual {without} vs {after}"
    );
    std::fs::remove_file(adapter.join("fedtune_residual.safetensors")).unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(["eval", "loss", "--config", config.to_str().unwrap()])
        .args([
            "--adapter",
            adapter.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("fedtune_residual.safetensors"), "{err}");
}
