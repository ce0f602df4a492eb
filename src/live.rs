//! The live view: a small web page that follows running (or finished)
//! courses from their `metrics.jsonl`.
//!
//! `fedtune serve RUN_DIR...` and `fedtune run … --serve [ADDR]` start it.
//! The server is plain HTTP/1.1 on threads (no framework), bound to
//! loopback unless told otherwise, with three routes and nothing used of
//! the request but its first line:
//!
//! - `/` — the page (`live.html`, compiled in);
//! - `/runs` — the runs as JSON: name, rounds and clients (from the run's
//!   `config.toml`), whether `summary.json` exists yet;
//! - `/events?run=N` — server-sent events: every line of run `N`'s
//!   `metrics.jsonl` as it is written (the file is followed as `tail -f`
//!   would), then an `end` event once `summary.json` exists.
//!
//! The page draws each run's held-out loss per client per round, the
//! training loss and bytes per round, each client's status in the current
//! round (training; done; no update: the round ended without one, the
//! client not sampled or dropped) and the round timer with an estimate of
//! the time left.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

const PAGE: &str = include_str!("live.html");

/// How often a followed `metrics.jsonl` is read for new lines.
const POLL: Duration = Duration::from_millis(200);

/// The longest request (or header) line read; longer ones are cut there.
const MAX_REQUEST_LINE: usize = 2048;

/// Header lines read before answering (the rest are left unread).
const MAX_HEADER_LINES: usize = 64;

/// A live view serving some run directories.
pub struct LiveView {
    addr: SocketAddr,
}

impl LiveView {
    /// Serves `runs` on `addr` (`127.0.0.1:0`: a free loopback port) from
    /// a background thread, for as long as the process runs.
    pub fn start(runs: Vec<PathBuf>, addr: &str) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("live view: cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let runs = Arc::new(runs);
        std::thread::Builder::new()
            .name("live-view".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let runs = runs.clone();
                    let _ = std::thread::Builder::new()
                        .name("live-view-conn".into())
                        .spawn(move || {
                            if let Err(e) = answer(stream, &runs) {
                                tracing::debug!("live view: {e:#}");
                            }
                        });
                }
            })?;
        Ok(Self { addr })
    }

    /// The page's address.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

/// `fedtune serve`: serves `dirs` until the process is stopped.
pub fn serve(dirs: Vec<PathBuf>, addr: &str) -> Result<()> {
    for d in &dirs {
        anyhow::ensure!(d.is_dir(), "{} is not a run directory", d.display());
    }
    let view = LiveView::start(dirs, addr)?;
    // The address goes to stdout first, for scripts and tests to read.
    println!("{}", view.url());
    eprintln!("live view of the runs at {} (Ctrl-C to stop)", view.url());
    loop {
        std::thread::park();
    }
}

fn answer(stream: TcpStream, runs: &[PathBuf]) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_REQUEST_LINE as u64)
        .read_until(b'\n', &mut line)?;
    // The headers are read (and ignored) too: closing a socket with
    // unread request bytes resets the connection, and the browser may
    // lose the reply.
    let mut header = Vec::new();
    for _ in 0..MAX_HEADER_LINES {
        header.clear();
        let n = reader
            .by_ref()
            .take(MAX_REQUEST_LINE as u64)
            .read_until(b'\n', &mut header)?;
        if n == 0 || header == b"\r\n" || header == b"\n" {
            break;
        }
    }
    let line = String::from_utf8_lossy(&line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = stream;
    if method != "GET" {
        return reply(
            &mut out,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
        );
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/" => reply(
            &mut out,
            "200 OK",
            "text/html; charset=utf-8",
            PAGE.as_bytes(),
        ),
        "/runs" => {
            let list: Vec<serde_json::Value> = runs.iter().map(|d| describe(d)).collect();
            let body = serde_json::to_vec(&list)?;
            reply(&mut out, "200 OK", "application/json", &body)
        }
        "/events" => {
            let run = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("run="))
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| runs.get(n));
            match run {
                Some(dir) => follow(&mut out, dir),
                None => reply(&mut out, "404 Not Found", "text/plain", b"no such run\n"),
            }
        }
        _ => reply(&mut out, "404 Not Found", "text/plain", b"not found\n"),
    }
}

fn reply(out: &mut TcpStream, status: &str, kind: &str, body: &[u8]) -> Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)?;
    Ok(())
}

/// A run's name, planned rounds and clients, and whether it has ended.
fn describe(dir: &Path) -> serde_json::Value {
    let cfg: Option<toml::Table> = std::fs::read_to_string(dir.join("config.toml"))
        .ok()
        .and_then(|t| t.parse().ok());
    let get = |key: &str| {
        cfg.as_ref()
            .and_then(|c| c.get("federate")?.get(key)?.as_integer())
    };
    serde_json::json!({
        "name": dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "rounds": get("rounds"),
        "clients": get("clients"),
        "done": dir.join("summary.json").is_file(),
    })
}

/// Streams `dir/metrics.jsonl` as server-sent events until the run has
/// ended and every line is sent, or the browser goes away.
fn follow(out: &mut TcpStream, dir: &Path) -> Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
         Connection: close\r\n\r\n"
    )?;
    let path = dir.join("metrics.jsonl");
    let mut offset = 0u64;
    let mut partial = String::new();
    let mut idle = 0u32;
    loop {
        // Decide before reading, so that lines written just before the
        // summary are sent before `end`.
        let ended = dir.join("summary.json").is_file();
        let mut fresh = String::new();
        if let Ok(mut f) = std::fs::File::open(&path) {
            if f.metadata().map(|m| m.len()).unwrap_or(0) < offset {
                offset = 0; // rewritten (--overwrite): start again
                partial.clear();
            }
            f.seek(SeekFrom::Start(offset))?;
            offset += f.read_to_string(&mut fresh)? as u64;
        }
        partial.push_str(&fresh);
        while let Some(end) = partial.find('\n') {
            let line: String = partial.drain(..=end).collect();
            let line = line.trim();
            if !line.is_empty() {
                write!(out, "data: {line}\n\n")?;
            }
        }
        if ended {
            write!(out, "event: end\ndata: {{}}\n\n")?;
            return Ok(());
        }
        // A comment now and then finds a closed connection.
        idle += 1;
        if idle.is_multiple_of(25) {
            write!(out, ": alive\n\n")?;
        }
        out.flush()?;
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: &str, target: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    #[test]
    fn the_page_the_runs_and_a_followed_metrics_file() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run-a");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            run.join("config.toml"),
            "[federate]\nrounds = 3\nclients = 2\n",
        )
        .unwrap();
        let metrics = run.join("metrics.jsonl");
        std::fs::write(
            &metrics,
            "{\"event\":\"eval\",\"round\":0}\n{\"event\":\"tr",
        )
        .unwrap();
        let view = LiveView::start(vec![run.clone()], "127.0.0.1:0").unwrap();
        let addr = view
            .url()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();

        assert!(get(&addr, "/").contains("<title>fedtune live</title>"));
        let runs = get(&addr, "/runs");
        assert!(
            runs.contains("\"name\":\"run-a\"") && runs.contains("\"rounds\":3"),
            "{runs}"
        );
        assert!(get(&addr, "/events?run=7").starts_with("HTTP/1.1 404"));
        // A request with many headers still gets its whole reply (unread
        // request bytes at close would reset the connection).
        for _ in 0..5 {
            let mut s = TcpStream::connect(&addr).unwrap();
            let mut request = "GET /runs HTTP/1.1\r\n".to_string();
            for i in 0..60 {
                request.push_str(&format!("X-Padding-{i}: {}\r\n", "x".repeat(1500)));
            }
            request.push_str("\r\n");
            s.write_all(request.as_bytes()).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            assert!(reply.contains("\"name\":\"run-a\""), "{reply}");
        }
        assert!(get(&addr, "/../etc/passwd").starts_with("HTTP/1.1 404"));

        // Lines arrive as they are completed; `end` once the summary exists.
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(s, "GET /events?run=0 HTTP/1.1\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut reader = BufReader::new(s);
        let mut next_data = || loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
            if let Some(d) = line.strip_prefix("data: ") {
                return d.trim().to_string();
            }
            if line.starts_with("event: end") {
                return "END".to_string();
            }
        };
        assert_eq!(next_data(), "{\"event\":\"eval\",\"round\":0}");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics)
            .unwrap();
        f.write_all(b"ain\",\"round\":1}\n").unwrap();
        assert_eq!(next_data(), "{\"event\":\"train\",\"round\":1}");
        f.write_all(b"{\"event\":\"round\",\"round\":1}\n").unwrap();
        std::fs::write(run.join("summary.json"), "{}").unwrap();
        assert_eq!(next_data(), "{\"event\":\"round\",\"round\":1}");
        assert_eq!(next_data(), "END");
    }
}
