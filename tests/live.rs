//! The live view: `fedtune serve` follows a run directory, and `fedtune run
//! --serve` shows a running course in a real headless browser (Chromium
//! driven over WebDriver by chromedriver, both from Debian's packages) that
//! sees a round appear while the course runs.
//!
//! `tests/run.sh` installs Chromium when it is missing and sets
//! `FEDTUNE_REQUIRE_BROWSER=1`, so there the browser test cannot pass
//! without a browser; run alone without one, it says so and does nothing.
//! `FEDTUNE_SCREENSHOT=FILE` saves the page as PNG (the README's picture).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fedtune() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedtune"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// A course on a tiny model that runs for a while: `rounds` rounds of two
/// clients.
fn course(dir: &Path, rounds: u32) -> PathBuf {
    let model = dir.join("model");
    let ok = fedtune()
        .args(["model", "tiny", "--out", model.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success());
    let config = dir.join("course.toml");
    std::fs::write(
        &config,
        format!(
            "[federate]\nname = \"tiny-live\"\nrounds = {rounds}\nclients = 2\nseed = 5\n\n\
             [model]\npath = {model:?}\n\n\
             [data]\nname = \"gsm8k\"\ntest_fraction = 0.1\nmax_tokens = 128\nlimit_per_client = 32\neval_limit = 8\n\n\
             [train]\nlocal_steps = 6\nbatch_size = 4\n\n[optim]\nlr = 1e-3\n"
        ),
    )
    .unwrap();
    config
}

/// Kills the child when dropped (a failed assertion leaves no process behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP request to `addr`; returns the body (read to its
/// Content-Length: chromedriver keeps connections open), or to the end.
fn http(addr: &str, method: &str, path: &str, body: Option<&serde_json::Value>) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut raw = Vec::new();
    match length {
        Some(n) => {
            raw.resize(n, 0);
            reader.read_exact(&mut raw).unwrap();
        }
        None => {
            reader.read_to_end(&mut raw).unwrap();
        }
    }
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn fedtune_serve_follows_a_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let config = course(dir.path(), 2);
    let out = dir.path().join("run");
    let ok = fedtune()
        .args([
            "run",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut child = Killed(
        fedtune()
            .args(["serve", out.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut url = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let addr = url
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let runs: serde_json::Value = serde_json::from_str(&http(addr, "GET", "/runs", None)).unwrap();
    assert_eq!(runs[0]["name"], "run");
    assert_eq!(runs[0]["rounds"], 2);
    assert_eq!(runs[0]["done"], true);
    // A finished run's events: every line of metrics.jsonl, then the end.
    let events = http(addr, "GET", "/events?run=0", None);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let sent: Vec<&str> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let written: Vec<&str> = metrics.lines().collect();
    assert_eq!(&sent[..written.len()], &written[..]);
    assert!(events.contains("event: end"));
    let err = fedtune().args(["serve", "/no/such/run"]).output().unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("is not a run directory"));
}

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Standard base64 (a screenshot's PNG).
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().fold(0u32, |acc, &d| acc << 6 | d) << (6 * (4 - chunk.len()));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

#[test]
fn a_headless_browser_sees_a_round_appear_in_a_running_course() {
    let (Some(chromium), Some(driver)) = (
        find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]),
        find(&["/usr/bin/chromedriver"]),
    ) else {
        assert!(
            std::env::var("FEDTUNE_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "FEDTUNE_REQUIRE_BROWSER=1 but chromium or chromedriver is missing"
        );
        eprintln!("no chromium and chromedriver: the browser test did nothing");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = course(dir.path(), 40);
    let out = dir.path().join("run");
    let mut run = Killed(
        fedtune()
            .args([
                "run",
                config.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--quiet",
            ])
            .arg("--serve")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(run.0.stderr.take().unwrap());
    let url = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no live view address"
        );
        if let Some(u) = line.trim().strip_prefix("live view: ") {
            break u.to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));

    let port = free_port();
    let _driver = Killed(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let wd = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while TcpStream::connect(&wd).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1000,900"]
        }
    }}});
    let session: serde_json::Value =
        serde_json::from_str(&http(&wd, "POST", "/session", Some(&caps))).unwrap();
    let id = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {session}"))
        .to_string();
    let nav = serde_json::json!({ "url": url });
    http(&wd, "POST", &format!("/session/{id}/url"), Some(&nav));
    assert!(
        run.0.try_wait().unwrap().is_none(),
        "the course ended before the page loaded"
    );

    // The page shows the course's rounds as they finish.
    let script = serde_json::json!({
        "script": "const s = document.getElementById('run-0-status'); \
                   return s ? [s.dataset.roundsDone || '0', s.textContent, \
                   document.querySelectorAll('#run-0-clients tr').length] : null;",
        "args": []
    });
    let mut seen = None;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(180) {
        let v: serde_json::Value = serde_json::from_str(&http(
            &wd,
            "POST",
            &format!("/session/{id}/execute/sync"),
            Some(&script),
        ))
        .unwrap();
        let done: u64 = v["value"][0].as_str().unwrap_or("0").parse().unwrap_or(0);
        if done >= 1 {
            seen = Some(v["value"].clone());
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let seen = seen.expect("no round appeared on the page");
    let status = seen[1].as_str().unwrap();
    assert!(status.contains("/ 40"), "{status}");
    assert_eq!(seen[2], 3, "a header and a row per client: {seen}");
    let alive = run.0.try_wait().unwrap().is_none();
    assert!(alive, "the course should still be running: {status}");

    if let Ok(path) = std::env::var("FEDTUNE_SCREENSHOT") {
        // Let a few more rounds arrive so the charts have lines.
        std::thread::sleep(Duration::from_secs(8));
        let shot: serde_json::Value = serde_json::from_str(&http(
            &wd,
            "GET",
            &format!("/session/{id}/screenshot"),
            None,
        ))
        .unwrap();
        let png = base64(shot["value"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::write(path, png).unwrap();
    }
    http(&wd, "DELETE", &format!("/session/{id}"), None);
}
