//! Models by Hugging Face id against a hub on loopback: a small HTTP server
//! in this test serves tiny models in the hub's layout (`/ORG/NAME/resolve/
//! REVISION/FILE`, with the `x-repo-commit`, `etag` and `Content-Range`
//! headers the hub sends, and LFS files' SHA-256 as their ETag), and
//! `fedtune` is pointed at it with `HF_ENDPOINT`. No traffic leaves 127.0.0.1.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

const TOKEN: &str = "hf_loopback_secret";

/// One repository revision: its commit and files.
struct Revision {
    commit: String,
    files: HashMap<String, Vec<u8>>,
    /// Serve these files with one byte changed (the ETag stays the true hash).
    corrupt: Vec<String>,
}

#[derive(Default)]
struct Hub {
    /// `(ORG/NAME, revision)` → files.
    repos: Mutex<HashMap<(String, String), Revision>>,
    requests: AtomicUsize,
}

impl Hub {
    fn serve(self: Arc<Self>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let hub = self.clone();
                std::thread::spawn(move || hub.answer(stream));
            }
        });
        port
    }

    fn answer(&self, mut stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        let path = request_line.split_whitespace().nth(1).unwrap_or("");
        let reply =
            |stream: &mut TcpStream, status: &str, extra: &[(String, String)], body: &[u8]| {
                let mut head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in extra {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            };
        if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
            return reply(&mut stream, "401 Unauthorized", &[], b"Invalid credentials");
        }
        // /ORG/NAME/resolve/REVISION/FILE (the revision may hold slashes: not here).
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        let repos = self.repos.lock().unwrap();
        let found = match parts.as_slice() {
            [org, name, "resolve", rev, file] => repos
                .get(&(format!("{org}/{name}"), rev.to_string()))
                .and_then(|r| Some((r, r.files.get(*file)?, *file))),
            _ => None,
        };
        let Some((rev, content, file)) = found else {
            let err = [("x-error-code".to_string(), "EntryNotFound".to_string())];
            return reply(&mut stream, "404 Not Found", &err, b"Entry not found");
        };
        let etag = if file.ends_with(".safetensors") {
            format!("{:x}", Sha256::digest(content))
        } else {
            format!("{:x}", Sha256::digest(content))[..40].to_string()
        };
        let mut body = content.clone();
        if rev.corrupt.iter().any(|c| c == file) {
            let mid = body.len() / 2;
            body[mid] ^= 0x55;
        }
        let size = body.len();
        let (start, end) = match headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
            Some(r) => {
                let (a, b) = r.split_once('-').unwrap();
                let a: usize = a.parse().unwrap();
                let b: usize = if b.is_empty() {
                    size - 1
                } else {
                    b.parse().unwrap()
                };
                (a, b.min(size - 1))
            }
            None => (0, size - 1),
        };
        let extra = vec![
            ("x-repo-commit".to_string(), rev.commit.clone()),
            ("etag".to_string(), format!("\"{etag}\"")),
            (
                "Content-Range".to_string(),
                format!("bytes {start}-{end}/{size}"),
            ),
        ];
        reply(
            &mut stream,
            "206 Partial Content",
            &extra,
            &body[start..=end],
        );
    }

    fn publish(&self, repo: &str, revision: &str, commit: &str, files: HashMap<String, Vec<u8>>) {
        self.repos.lock().unwrap().insert(
            (repo.to_string(), revision.to_string()),
            Revision {
                commit: commit.to_string(),
                files,
                corrupt: vec![],
            },
        );
    }
}

fn read_dir(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The files of `dir` with its weights split into two shards and an index.
fn sharded(dir: &Path) -> HashMap<String, Vec<u8>> {
    let mut files = read_dir(dir);
    files.remove("model.safetensors");
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let tmp = tempfile::tempdir().unwrap();
    for s in 0..2 {
        let shard = format!("model-{:05}-of-00002.safetensors", s + 1);
        let part: HashMap<String, Tensor> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == s)
            .map(|(_, n)| {
                weight_map.insert((*n).clone(), shard.clone().into());
                ((*n).clone(), tensors[*n].clone())
            })
            .collect();
        let path = tmp.path().join(&shard);
        candle_core::safetensors::save(&part, &path).unwrap();
        files.insert(shard, std::fs::read(path).unwrap());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    files.insert(
        "model.safetensors.index.json".into(),
        index.to_string().into_bytes(),
    );
    files
}

struct Env {
    home: PathBuf,
    endpoint: String,
}

impl Env {
    fn fedtune(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedtune"));
        cmd.args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("HF_HOME", &self.home)
            .env("HF_ENDPOINT", &self.endpoint)
            .env("HF_TOKEN", TOKEN)
            .env_remove("HF_HUB_OFFLINE");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().expect("fedtune runs")
    }

    fn ok(&self, args: &[&str], extra: &[(&str, &str)]) -> String {
        let out = self.fedtune(args, extra);
        assert!(
            out.status.success(),
            "fedtune {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str], extra: &[(&str, &str)]) -> String {
        let out = self.fedtune(args, extra);
        assert!(!out.status.success(), "fedtune {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn eval_loss(
    env: &Env,
    config: &Path,
    model: &str,
    adapter: Option<&Path>,
    extra: &[(&str, &str)],
) -> f64 {
    let mut args = vec![
        "eval".to_string(),
        "loss".into(),
        "--config".into(),
        config.display().to_string(),
        "--model".into(),
        model.into(),
        "--quiet".into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), a.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report: serde_json::Value = serde_json::from_str(&env.ok(&args, extra)).unwrap();
    report["score"].as_f64().unwrap()
}

/// `fedtune eval loss` of `model` that must fail: its error output.
fn eval_fails(env: &Env, config: &Path, model: &str, extra: &[(&str, &str)]) -> String {
    env.fails(
        &[
            "eval",
            "loss",
            "--config",
            config.to_str().unwrap(),
            "--model",
            model,
            "--quiet",
        ],
        extra,
    )
}

#[test]
fn a_course_trains_a_model_named_by_its_hub_id() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny");
    let status = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args([
            "model",
            "tiny",
            "--family",
            "qwen2",
            "--out",
            tiny.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let hub = Arc::new(Hub::default());
    let c1 = "1111111111111111111111111111111111111111";
    let c2 = "2222222222222222222222222222222222222222";
    hub.publish("test-org/tiny-qwen", "main", c1, read_dir(&tiny));
    hub.publish("test-org/tiny-qwen", "v2", c2, sharded(&tiny));
    let port = hub.clone().serve();
    let env = Env {
        home: dir.path().join("hf-home"),
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let config = dir.path().join("course.toml");
    std::fs::write(
        &config,
        "[federate]\nname = \"tiny-hub\"\nrounds = 2\nclients = 2\nseed = 5\n\n\
         [model]\npath = \"hf:test-org/tiny-qwen\"\n\n\
         [data]\nname = \"gsm8k\"\ntest_fraction = 0.1\nmax_tokens = 96\nlimit_per_client = 16\neval_limit = 4\n\n\
         [train]\nlocal_steps = 2\nbatch_size = 2\n\n[optim]\nlr = 1e-2\n",
    )
    .unwrap();

    // A malformed id is a config error at its key, before anything is fetched.
    let err = env.fails(
        &[
            "run",
            config.to_str().unwrap(),
            "--set",
            "model.path=\"hf:test-org/../x\"",
            "--dry-run",
        ],
        &[],
    );
    assert!(
        err.contains("model.path") && err.contains("is not a Hugging Face model id"),
        "{err}"
    );
    assert_eq!(hub.requests.load(Ordering::SeqCst), 0);

    // The course downloads the model into the Hugging Face cache and records the id.
    let out = dir.path().join("run");
    env.ok(
        &[
            "run",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
        &[],
    );
    let adapter = out.join("adapter");
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["base_model_name_or_path"], "test-org/tiny-qwen");
    let snapshot = env
        .home
        .join("hub/models--test-org--tiny-qwen/snapshots")
        .join(c1);
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(snapshot.join(file).is_file(), "{file} in the cache");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let after = summary["test_loss_after"].as_f64().unwrap();

    // Offline, from the cache alone: the same loss, and the hub is not asked.
    let asked = hub.requests.load(Ordering::SeqCst);
    let offline = [("HF_HUB_OFFLINE", "1")];
    let reloaded = eval_loss(
        &env,
        &config,
        "hf:test-org/tiny-qwen",
        Some(&adapter),
        &offline,
    );
    assert!((reloaded - after).abs() < 1e-4, "{reloaded} vs {after}");
    assert_eq!(
        hub.requests.load(Ordering::SeqCst),
        asked,
        "offline asked the hub"
    );
    let err = eval_fails(&env, &config, "hf:test-org/other", &offline);
    assert!(
        err.contains("HF_HUB_OFFLINE is set and config.json of test-org/other is not in the cache"),
        "{err}"
    );

    // A revision whose weights are sharded: the same model, the same loss.
    let base_main = eval_loss(&env, &config, "hf:test-org/tiny-qwen", None, &[]);
    let base_v2 = eval_loss(&env, &config, "hf:test-org/tiny-qwen@v2", None, &[]);
    assert_eq!(base_main, base_v2);
    let v2 = env
        .home
        .join("hub/models--test-org--tiny-qwen/snapshots")
        .join(c2);
    assert!(v2.join("model-00002-of-00002.safetensors").is_file());

    // Without the token the hub refuses, and the error says who and what.
    let err = eval_fails(
        &env,
        &config,
        "hf:test-org/tiny-qwen@v3",
        &[("HF_TOKEN", "wrong")],
    );
    assert!(
        err.contains("downloading config.json of test-org/tiny-qwen@v3 from http://127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("401"), "{err}");

    // Weights that do not hash to their ETag are refused and not kept.
    let files = read_dir(&tiny);
    let weights = files["model.safetensors"].clone();
    hub.publish("test-org/tampered", "main", c1, files);
    hub.repos
        .lock()
        .unwrap()
        .get_mut(&("test-org/tampered".to_string(), "main".to_string()))
        .unwrap()
        .corrupt
        .push("model.safetensors".into());
    let err = eval_fails(&env, &config, "hf:test-org/tampered", &[]);
    let sha = format!("{:x}", Sha256::digest(&weights));
    assert!(
        err.contains("model.safetensors of test-org/tampered: SHA-256 is")
            && err.contains(&format!("the hub announced {sha}")),
        "{err}"
    );
    let blobs = env.home.join("hub/models--test-org--tampered/blobs");
    assert!(!blobs.join(&sha).exists(), "the bad blob was kept");
}
