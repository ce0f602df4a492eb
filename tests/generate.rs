//! `fedtune generate` and `fedtune chat` on a tiny random model.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedtune"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    let o = bin()
        .args(["model", "tiny", "--out", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    model
}

fn generate(model: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["generate", "--quiet", "--model", model.to_str().unwrap()])
        .args([
            "--prompt",
            "Natalia sold 48 clips",
            "--max-new-tokens",
            "24",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn json_text(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["new_tokens"].as_u64().unwrap() > 0, "{v}");
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn generate_with_a_fixed_seed_is_deterministic_and_streams_what_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let sampled = |seed: &str| {
        json_text(&generate(
            &model,
            // The random model is sharply peaked: a high temperature
            // makes every seed matter.
            &["--temperature", "100", "--seed", seed, "--json"],
        ))
    };
    let a = sampled("7");
    assert_eq!(a, sampled("7"), "same seed, same text");
    assert_ne!(a, sampled("8"), "another seed samples other text");
    // Greedy: the streamed text is the returned text.
    let greedy = json_text(&generate(&model, &["--template", "raw", "--json"]));
    let streamed = generate(&model, &["--template", "raw"]);
    assert!(streamed.status.success(), "{}", text(&streamed.stderr));
    assert_eq!(text(&streamed.stdout), format!("{greedy}\n"));
    // Settings are checked before the model loads, naming the flag.
    let o = generate(&model, &["--temperature=-1"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("--temperature"),
        "{}",
        text(&o.stderr)
    );
    let o = generate(&model, &["--template", "nosuch"]);
    assert!(
        text(&o.stderr).contains("--template nosuch"),
        "{}",
        text(&o.stderr)
    );
}

/// A chat process with its stdin open and its stderr collected.
struct Chat {
    child: std::process::Child,
    stderr: Arc<Mutex<String>>,
}

impl Chat {
    fn start(model: &Path) -> Self {
        let mut child = bin()
            .args(["chat", "--quiet", "--max-new-tokens", "8"])
            .args(["--model", model.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&text(&buf[..n]));
            }
        });
        Self { child, stderr }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits until the chat has shown its prompt `n` times.
    fn wait_for_prompt(&self, n: usize) {
        let start = Instant::now();
        while self.stderr.lock().unwrap().matches("> ").count() < n {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no prompt: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (status, out)
    }
}

#[test]
fn chat_answers_each_line_and_leaves_cleanly_on_eof_and_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // End of input after two questions: two answers, exit status 0.
    let mut chat = Chat::start(&model);
    chat.say("Hello");
    chat.say("And then?");
    drop(chat.child.stdin.take());
    let stderr = chat.stderr.clone();
    let (status, out) = chat.finish();
    assert!(status.success(), "{status:?}: {}", stderr.lock().unwrap());
    // A prompt before each question and after the last answer (the
    // answers, on stdout, are random bytes of any shape).
    assert_eq!(stderr.lock().unwrap().matches("> ").count(), 3);
    assert!(!out.is_empty());
    assert!(stderr
        .lock()
        .unwrap()
        .contains("plain User:/Assistant: layout"));
    // Ctrl-C at the prompt after an answer: exit status 0 as well.
    let mut chat = Chat::start(&model);
    chat.say("Hello");
    chat.wait_for_prompt(2);
    let pid = chat.child.id().to_string();
    let kill = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(kill.success());
    let (status, _) = chat.finish();
    assert!(status.success(), "Ctrl-C at the prompt: {status:?}");
}
