//! Distributed courses end to end: a nats-server with a user per party, a
//! `fedtune server` process and `fedtune client` processes, on a tiny model.
//! Each test starts its own nats-server on a free loopback port.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fedtune_broker::LocalNats;

fn fedtune() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedtune"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn run(args: &[&str]) -> Output {
    let out = fedtune().args(args).output().expect("fedtune runs");
    assert!(
        out.status.success(),
        "fedtune {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process, killed if the test ends (or fails) while it runs.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(args: &[String], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = fedtune()
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("fedtune starts");
        Self { child, log }
    }

    /// Waits for the process to end; panics with its output after `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("still running after {limit:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn succeeds(&mut self) {
        let status = self.wait(Duration::from_secs(180));
        assert!(status.success(), "{status}:\n{}", self.output());
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tiny model and a 3-client LoRA course on Fed-GSM8K-3 over it, with `extra` lines in [federate].
fn tiny_course(dir: &Path, federate: &str, local_steps: usize) -> PathBuf {
    let model = dir.join("model");
    run(&[
        "model",
        "tiny",
        "--out",
        model.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    let config = dir.join("course.toml");
    std::fs::write(
        &config,
        format!(
            "[federate]\nname = \"tiny\"\nclients = 3\nseed = 7\n{federate}\n\n\
             [trainer]\nkind = \"lora\"\n\n\
             [model]\npath = {model:?}\n\n\
             [data]\nname = \"gsm8k\"\nsplitter = \"uniform\"\ntest_fraction = 0.1\ntemplate = \"alpaca\"\n\
             max_tokens = 128\nlimit_per_client = 40\neval_limit = 8\n\n\
             [lora]\nr = 4\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\n\
             [train]\nlocal_steps = {local_steps}\nbatch_size = 2\n\n\
             [optim]\nlr = 1e-3\n"
        ),
    )
    .unwrap();
    config
}

/// A nats-server for `clients` clients of course `tiny`, one user per party.
fn broker(dir: &Path, clients: u32) -> (LocalNats, PathBuf) {
    let creds = dir.join("broker");
    run(&[
        "broker",
        "config",
        "--course",
        "tiny",
        "--clients",
        &clients.to_string(),
        "--out",
        creds.to_str().unwrap(),
    ]);
    let nats = LocalNats::start(Some(&creds.join("nats-server.conf"))).expect("nats-server starts");
    (nats, creds)
}

fn server(config: &Path, nats: &LocalNats, creds: &Path, out: &Path, extra: &[&str]) -> Proc {
    server_at(config, &nats.url(), creds, out, extra)
}

fn server_at(config: &Path, url: &str, creds: &Path, out: &Path, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "server".into(),
        config.display().to_string(),
        "--nats".into(),
        url.to_string(),
        "--creds".into(),
        creds.join("server.json").display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--log".into(),
        "info".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let log = out.with_extension("out");
    Proc::start(&args, log)
}

fn client(config: &Path, nats: &LocalNats, creds: &Path, id: u32, extra: &[&str]) -> Proc {
    client_at(config, &nats.url(), creds, id, extra)
}

fn client_at(config: &Path, url: &str, creds: &Path, id: u32, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "client".into(),
        config.display().to_string(),
        "--nats".into(),
        url.to_string(),
        "--id".into(),
        id.to_string(),
        "--creds".into(),
        creds
            .join(format!("client-{id}.json"))
            .display()
            .to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let log = config.with_file_name(format!("client-{id}-{}.out", rand_tag()));
    Proc::start(&args, log)
}

/// Distinguishes the logs of a restarted client.
fn rand_tag() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// An adapter directory's tensors, a LoRA residual's included.
fn adapter(dir: &Path) -> HashMap<String, Vec<f32>> {
    let load =
        |file: &str| candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu);
    let mut tensors = load("adapter_model.safetensors").unwrap();
    if let Ok(residual) = load("fedtune_residual.safetensors") {
        tensors.extend(residual);
    }
    tensors
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn max_abs_diff(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> f32 {
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect()
    );
    a.iter()
        .flat_map(|(k, x)| x.iter().zip(&b[k]).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn records(metrics: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until the metrics file has a record for which `pred` holds.
fn wait_for(metrics: &Path, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let started = Instant::now();
    while !records(metrics).iter().any(&pred) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no {what} in {}",
            metrics.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the course in one process (the reference); returns its output directory.
fn in_process(config: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("inproc");
    run(&[
        "run",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    out
}

/// Runs `config` as a server process and three client processes over a
/// broker of their own; returns the server's run directory.
fn over_nats(config: &Path, dir: &Path) -> PathBuf {
    let (nats, creds) = broker(dir, 3);
    let out = dir.join("server");
    let mut srv = server(config, &nats, &creds, &out, &[]);
    let mut clients: Vec<Proc> = (1..=3)
        .map(|id| client(config, &nats, &creds, id, &[]))
        .collect();
    all_succeed(&mut srv, &mut clients);
    out
}

/// A run directory's `summary.json`.
fn summary_of(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

/// Waits for the server and every client to exit successfully.
fn all_succeed(server: &mut Proc, clients: &mut [Proc]) {
    server.succeeds();
    for c in clients {
        c.succeeds();
    }
}

/// The largest difference between the final adapters of two run directories.
fn adapter_diff(a: &Path, b: &Path) -> f32 {
    max_abs_diff(&adapter(&a.join("adapter")), &adapter(&b.join("adapter")))
}

fn round_record(metrics: &Path, round: u64) -> serde_json::Value {
    records(metrics)
        .into_iter()
        .rfind(|r| r["event"] == "round" && r["round"] == round)
        .unwrap_or_else(|| panic!("no record of round {round}"))
}

#[test]
fn a_server_and_three_client_processes_end_where_the_in_process_course_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "rounds = 2", 3);
    let inproc = in_process(&config, dir.path());

    let (nats, creds) = broker(dir.path(), 3);
    let out = dir.path().join("server");
    // Clients first: their join_in finds no server and is retried.
    let mut clients: Vec<Proc> = (1..=3)
        .map(|id| client(&config, &nats, &creds, id, &[]))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut srv = server(&config, &nats, &creds, &out, &[]);
    all_succeed(&mut srv, &mut clients);
    let diff = adapter_diff(&inproc, &out);
    assert!(diff <= 1e-6, "final adapters differ by {diff}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(inproc.join("summary.json")).unwrap())
            .unwrap();
    let (a, b) = (
        summary["loss_last"]["test"].as_f64().unwrap(),
        reference["test_loss_after"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-6,
        "test loss {a} over NATS vs {b} in process"
    );
    // A checkpoint per round, and the traffic that crossed the broker counted.
    assert!(out
        .join("checkpoints/round-0001/adapter_model.safetensors")
        .is_file());
    assert!(out
        .join("checkpoints/round-0002/adapter_model.safetensors")
        .is_file());
    assert!(summary["bytes_up"].as_u64().unwrap() > 0);
    assert_eq!(summary["rejected_messages"], 0);
}

#[test]
fn a_client_killed_mid_round_is_dropped_and_rejoins_when_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(
        dir.path(),
        "rounds = 4\nround_timeout_s = 3.0\nmin_clients = 2\njoin_retry_s = 0.2",
        3,
    );
    let (nats, creds) = broker(dir.path(), 3);
    let out = dir.path().join("server");
    let metrics = out.join("metrics.jsonl");
    let mut srv = server(&config, &nats, &creds, &out, &[]);
    let mut c1 = client(&config, &nats, &creds, 1, &[]);
    let mut c2 = client(&config, &nats, &creds, 2, &[]);
    // Client 3 would train for an hour: it is surely mid-round when killed.
    let mut c3 = client(
        &config,
        &nats,
        &creds,
        3,
        &["--set", "train.local_steps=1000000"],
    );
    wait_for(&metrics, "evaluation before training", |r| {
        r["event"] == "eval" && r["round"] == 0 && r["client"].is_null()
    });
    std::thread::sleep(Duration::from_millis(300));
    c3.kill();
    wait_for(&metrics, "round 1", |r| {
        r["event"] == "round" && r["round"] == 1
    });
    let r1 = round_record(&metrics, 1);
    assert_eq!(
        r1["extra"]["clients"], 2.0,
        "round 1 completed with the others: {r1}"
    );
    assert_eq!(r1["extra"]["dropped"], 1.0);
    // Client 3 comes back and takes part in a later round.
    let mut back = client(&config, &nats, &creds, 3, &[]);
    srv.succeeds();
    c1.succeeds();
    c2.succeeds();
    back.succeeds();
    let trained_again = records(&metrics)
        .iter()
        .any(|r| r["event"] == "train" && r["client"] == 3 && r["round"].as_u64().unwrap() >= 2);
    assert!(trained_again, "client 3 trained again after it rejoined");
    assert_eq!(round_record(&metrics, 4)["extra"]["clients"], 3.0);
}

#[test]
fn a_killed_server_resumes_after_its_last_checkpoint_and_ends_as_if_never_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "rounds = 4\njoin_retry_s = 0.2", 20);
    let inproc = in_process(&config, dir.path());
    let (nats, creds) = broker(dir.path(), 3);
    let out = dir.path().join("server");
    let metrics = out.join("metrics.jsonl");
    let mut clients: Vec<Proc> = (1..=3)
        .map(|id| client(&config, &nats, &creds, id, &[]))
        .collect();
    let mut first = server(&config, &nats, &creds, &out, &[]);
    wait_for(&metrics, "round 2", |r| {
        r["event"] == "round" && r["round"] == 2
    });
    first.kill();
    // The clients keep running; the resumed server calls them back.
    let mut second = server(&config, &nats, &creds, &out, &["--resume"]);
    all_succeed(&mut second, &mut clients);
    assert!(
        second.output().contains("resuming after round"),
        "{}",
        second.output()
    );
    let diff = adapter_diff(&inproc, &out);
    assert!(diff <= 1e-6, "final adapters differ by {diff}");
}

#[test]
fn a_client_with_another_clients_credentials_or_none_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "rounds = 1", 1);
    let (nats, creds) = broker(dir.path(), 3);
    let out = dir.path().join("server");
    let mut srv = server(&config, &nats, &creds, &out, &[]);
    // Client 2 with client 1's credentials.
    let impostor = fedtune()
        .args([
            "client",
            config.to_str().unwrap(),
            "--nats",
            &nats.url(),
            "--id",
            "2",
            "--creds",
            creds.join("client-1.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&impostor.stderr);
    assert!(!impostor.status.success());
    assert!(
        err.contains("refused client 2") && err.contains("Permissions Violation"),
        "{err}"
    );
    // No credentials at all.
    let anonymous = fedtune()
        .args([
            "client",
            config.to_str().unwrap(),
            "--nats",
            &nats.url(),
            "--id",
            "2",
        ])
        .env_remove("FEDTUNE_NATS_CREDS")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&anonymous.stderr);
    assert!(!anonymous.status.success());
    assert!(err.contains("authorization violation"), "{err}");
    // The server never saw client 2.
    std::thread::sleep(Duration::from_millis(200));
    let log = std::fs::read_to_string(out.join("server.log")).unwrap();
    assert!(!log.contains("client=2"), "{log}");
    srv.kill();
}

#[test]
fn fedtune_run_over_nats_matches_the_in_process_run() {
    let dir = tempfile::tempdir().unwrap();
    let summary = |transport: &str| -> serde_json::Value {
        let out = dir.path().join(transport);
        let o = run(&[
            "run",
            "configs/least-squares.toml",
            "--set",
            &format!("broker.transport={transport}"),
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let local = summary("in-process");
    let nats = summary("nats");
    assert_eq!(local["final_loss"], nats["loss_last"]);
    assert!(dir.path().join("nats/client-5.out").is_file());
}

#[test]
fn a_course_survives_a_broker_restart_mid_course() {
    let dir = tempfile::tempdir().unwrap();
    // Rounds long enough that the broker goes away in the middle of one.
    let config = tiny_course(
        dir.path(),
        "rounds = 6\nround_timeout_s = 3.0\nmin_clients = 1\njoin_retry_s = 0.2",
        60,
    );
    let (mut nats, creds) = broker(dir.path(), 3);
    let out = dir.path().join("server");
    let metrics = out.join("metrics.jsonl");
    let mut srv = server(&config, &nats, &creds, &out, &[]);
    let mut clients: Vec<Proc> = (1..=3)
        .map(|id| client(&config, &nats, &creds, id, &[]))
        .collect();
    wait_for(&metrics, "round 2", |r| {
        r["event"] == "round" && r["round"] == 2
    });
    std::thread::sleep(Duration::from_millis(300));
    // The broker goes away for a second: every connection drops, whatever
    // was in flight is lost; the parties reconnect when it is back.
    nats.restart(Duration::from_secs(1)).unwrap();
    all_succeed(&mut srv, &mut clients);
    assert!(
        round_record(&metrics, 6)["extra"]["clients"]
            .as_f64()
            .unwrap()
            >= 1.0,
        "the last round was aggregated"
    );
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_course_runs_over_a_three_node_nats_cluster_with_parties_on_different_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "rounds = 2\njoin_retry_s = 0.2", 3);
    let inproc = in_process(&config, dir.path());
    // One user per party, as `fedtune broker config` writes them; each node
    // of the cluster takes that configuration plus routes to the other two.
    let creds = dir.path().join("broker");
    run(&[
        "broker",
        "config",
        "--course",
        "tiny",
        "--clients",
        "3",
        "--out",
        creds.to_str().unwrap(),
    ]);
    let base = std::fs::read_to_string(creds.join("nats-server.conf")).unwrap();
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nodes: Vec<LocalNats> = (0..3)
        .map(|i| {
            let others: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("\"nats-route://127.0.0.1:{}\"", routes[j]))
                .collect();
            let conf = dir.path().join(format!("node-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "{}\ncluster {{\n  name: fedtune\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    base.replace("jetstream", "# jetstream"),
                    routes[i],
                    others.join(", ")
                ),
            )
            .unwrap();
            LocalNats::start(Some(&conf)).expect("a cluster node starts")
        })
        .collect();
    // Let the routes form before anyone subscribes.
    std::thread::sleep(Duration::from_millis(1500));
    let out = dir.path().join("server");
    let mut srv = server_at(&config, &nodes[0].url(), &creds, &out, &[]);
    // Client 1 on node 2, client 2 on node 3, client 3 on node 1.
    let mut clients: Vec<Proc> = (1..=3u32)
        .map(|id| client_at(&config, &nodes[(id as usize) % 3].url(), &creds, id, &[]))
        .collect();
    all_succeed(&mut srv, &mut clients);
    let diff = adapter_diff(&inproc, &out);
    assert!(diff <= 1e-6, "final adapters differ by {diff}");
}

/// A certificate authority and a broker certificate for 127.0.0.1, made by
/// the `openssl` command: `(ca.pem, server.pem, server.key)`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (tests/run.sh installs it)");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fedtune test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[test]
fn a_course_runs_over_tls_and_a_party_without_the_authority_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let config = tiny_course(dir.path(), "rounds = 2\njoin_retry_s = 0.2", 3);
    let with_ca = dir.path().join("tls.toml");
    std::fs::write(
        &with_ca,
        format!(
            "{}\n[broker]\ntls_ca = {:?}\n",
            std::fs::read_to_string(&config).unwrap(),
            ca.to_str().unwrap()
        ),
    )
    .unwrap();
    let inproc = in_process(&config, dir.path());
    let creds = dir.path().join("broker");
    run(&[
        "broker",
        "config",
        "--course",
        "tiny",
        "--clients",
        "3",
        "--out",
        creds.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let nats =
        LocalNats::start(Some(&creds.join("nats-server.conf"))).expect("a TLS broker starts");
    let url = nats.url().replace("nats://", "tls://");

    // Without the authority the broker's certificate is not trusted.
    let out = dir.path().join("refused");
    let mut refused = server_at(&config, &url, &creds, &out, &[]);
    let status = refused.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "a party without tls_ca connected over TLS"
    );

    let out = dir.path().join("server");
    let mut srv = server_at(&with_ca, &url, &creds, &out, &[]);
    let mut clients: Vec<Proc> = (1..=3)
        .map(|id| client_at(&with_ca, &url, &creds, id, &[]))
        .collect();
    all_succeed(&mut srv, &mut clients);
    let diff = adapter_diff(&inproc, &out);
    assert!(diff <= 1e-6, "final adapters differ by {diff}");
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The soak test of docs/distributed.md (not in CI: minutes):
/// `cargo test --release --test distributed soak -- --ignored --nocapture`
/// (`SOAK_ROUNDS`, default 1000). The least-squares course over NATS with
/// clients killed and restarted at random and the server killed and resumed
/// every 100 rounds ends with the parameters of an undisturbed run, and the
/// server's memory stays flat.
#[test]
#[ignore]
fn soak_a_thousand_rounds_with_kills_end_as_an_undisturbed_course() {
    let rounds: u64 = std::env::var("SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("soak.toml");
    // Every client's update is needed (min_clients = 3): a killed client is
    // waited for (asked again every timeout) until its successor answers.
    std::fs::write(
        &config,
        format!(
            "[federate]\nname = \"soak\"\nrounds = {rounds}\nclients = 3\nseed = 5\neval_every = 50\n\
             round_timeout_s = 0.5\nmin_clients = 3\njoin_retry_s = 0.1\n\n\
             [trainer]\nkind = \"least-squares\"\n\n\
             [least_squares]\ndim = 16\nsamples_per_client = 1000\nlocal_steps = 1000\nlr = 0.05\n"
        ),
    )
    .unwrap();
    let creds = dir.path().join("broker");
    run(&[
        "broker",
        "config",
        "--course",
        "soak",
        "--clients",
        "3",
        "--out",
        creds.to_str().unwrap(),
    ]);
    let nats = LocalNats::start(Some(&creds.join("nats-server.conf"))).unwrap();
    let params = |dir: &Path| std::fs::read(dir.join("final/params.msgpack")).unwrap();

    // The undisturbed course, over the same broker.
    let reference = dir.path().join("undisturbed");
    let mut clients: Vec<Proc> = (1..=3)
        .map(|id| client(&config, &nats, &creds, id, &[]))
        .collect();
    let started = Instant::now();
    server(&config, &nats, &creds, &reference, &[]).wait(Duration::from_secs(3600));
    for c in clients.iter_mut() {
        c.succeeds();
    }
    let undisturbed_s = started.elapsed().as_secs_f64();

    let out = dir.path().join("server");
    let metrics = out.join("metrics.jsonl");
    let mut clients: Vec<Proc> = (1..=3)
        .map(|id| client(&config, &nats, &creds, id, &[]))
        .collect();
    let mut srv = server(&config, &nats, &creds, &out, &[]);
    let mut rng = 0x5eed_u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (mut kills, mut restarts, mut rss) = (0, 0, Vec::new());
    let started = Instant::now();
    loop {
        if let Some(status) = srv.child.try_wait().unwrap() {
            assert!(status.success(), "{}", srv.output());
            break;
        }
        let done = records(&metrics)
            .iter()
            .filter(|r| r["event"] == "round")
            .filter_map(|r| r["round"].as_u64())
            .max()
            .unwrap_or(0);
        if done / 100 > restarts && done < rounds {
            srv.kill();
            srv = server(&config, &nats, &creds, &out, &["--resume"]);
            restarts += 1;
        } else if next(10) == 0 {
            let id = next(3) as usize;
            clients[id].kill();
            std::thread::sleep(Duration::from_millis(next(500)));
            clients[id] = client(&config, &nats, &creds, id as u32 + 1, &[]);
            kills += 1;
        }
        // Warmed up: at least 20 rounds into this server process.
        if done % 100 >= 20 {
            rss.push(rss_kib(srv.child.id()));
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "the soak ran past an hour"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for c in clients.iter_mut() {
        c.succeeds();
    }
    let rss: Vec<u64> = rss.into_iter().filter(|&k| k > 0).collect();
    let (min, max) = (
        rss.iter().min().copied().unwrap_or(0),
        rss.iter().max().copied().unwrap_or(0),
    );
    println!(
        "soak: {rounds} rounds, {kills} client kills, {restarts} server restarts, {:.0} s (undisturbed {undisturbed_s:.0} s); server RSS after warm-up {min}–{max} KiB over {} samples",
        started.elapsed().as_secs_f64(),
        rss.len()
    );
    assert!(
        params(&out) == params(&reference),
        "the disturbed course ended elsewhere"
    );
    assert!(
        max as f64 <= min as f64 * 1.1,
        "server RSS grew: {min}–{max} KiB"
    );
}

/// Strategies that send each client its own message — other LoRA ranks
/// (FlexLoRA), extra tensors both ways with client-side state (SCAFFOLD),
/// a residual the clients merge (FedEx-LoRA, FLoRA) —
/// end over NATS where they end in one process; so do courses with
/// differential privacy, central and local, and with secure aggregation.
#[test]
fn per_client_strategies_end_over_nats_where_they_end_in_process() {
    for (name, extra) in [
        (
            "flexlora",
            "[aggregator]\nscript = \"flexlora\"\n[aggregator.params]\nranks = [2, 4]\n",
        ),
        (
            "scaffold",
            "[aggregator]\nscript = \"scaffold\"\n[hooks]\nscript = \"scaffold\"\n",
        ),
        // A residual the server sets and every client merges (FedEx-LoRA
        // broadcasts it; FLoRA sends each rank its own message with it).
        ("fedex_lora", "[aggregator]\nscript = \"fedex_lora\"\n"),
        (
            "flora",
            "[aggregator]\nscript = \"flora\"\n[aggregator.params]\nranks = [2, 4]\n",
        ),
        // Differential privacy: the server's noise, and each client's own
        // when asked to be reproducible, are seeded by the course, so
        // processes draw what one process does.
        (
            "dp-central",
            "[privacy]\ndp = \"central\"\nclip_norm = 0.05\nnoise_multiplier = 0.5\nadaptive_clip = true\ncount_noise = 1.0\n",
        ),
        (
            "dp-local",
            "[privacy]\ndp = \"local\"\nclip_norm = 0.05\nnoise_multiplier = 0.5\nreproducible_local_noise = true\n",
        ),
        // Secure aggregation: ring sums do not depend on arrival order, and
        // local DP's noise goes in before the masks.
        (
            "secagg-dp-local",
            "[privacy]\nsecure_aggregation = true\ndp = \"local\"\nclip_norm = 0.05\nnoise_multiplier = 0.5\nreproducible_local_noise = true\n",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_course(dir.path(), "rounds = 2", 2);
        let mut text = std::fs::read_to_string(&config).unwrap();
        let residual = name == "fedex_lora" || name == "flora";
        if residual {
            text = text.replace("[lora]\n", "[lora]\nresidual = true\n");
        }
        text.push_str(extra);
        std::fs::write(&config, text).unwrap();
        let inproc = in_process(&config, dir.path());
        let out = over_nats(&config, dir.path());
        let diff = adapter_diff(&inproc, &out);
        assert!(diff <= 1e-6, "{name}: final adapters differ by {diff}");
        if residual {
            let saved = adapter(&out.join("adapter"));
            let moved = saved
                .iter()
                .filter(|(n, _)| n.contains("lora_residual"))
                .any(|(_, v)| v.iter().any(|&x| x != 0.0));
            assert!(moved, "{name}: no residual saved, or all zero");
        }
        let summary = summary_of(&out);
        assert_eq!(summary["rejected_messages"], 0, "{name}");
        if name.contains("dp") {
            assert!(summary["privacy"]["epsilon"].as_f64().unwrap() > 0.0, "{name}");
        }
        if name.starts_with("secagg") {
            let sa = &summary["privacy"]["secure_aggregation"];
            assert!(sa["overhead_bytes"].as_u64().unwrap() > 0, "{name}: {sa}");
            assert_eq!(sa["left"], 0, "{name}");
        }
    }
}

/// `federate.keep_best` on a tiny model whose global adapter an aggregator
/// script zeroes from round 2 on (back to the base model, where LoRA's
/// gradients vanish): in one process and as a server process,
/// the best round's adapter is saved beside the final one, and patience
/// ends the course early.
#[test]
fn the_best_rounds_adapter_is_kept_and_patience_stops_the_course() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spoil.rhai"),
        "fn aggregate(global, updates, round) {\n    let mean = weighted_mean(updates);\n    if round >= 2 { scale(mean, 0.0) } else { mean }\n}\n",
    )
    .unwrap();
    let config = tiny_course(
        dir.path(),
        "rounds = 6\nsave_every = 1\nkeep_best = \"test_loss\"\nearly_stop_patience = 2\n",
        3,
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace("lr = 1e-3", "lr = 1e-2");
    text.push_str("[aggregator]\nscript = \"spoil.rhai\"\n");
    std::fs::write(&config, text).unwrap();
    let inproc = in_process(&config, dir.path());
    let summary = summary_of(&inproc);
    let best = &summary["best"];
    assert_eq!(best["key"], "test_loss");
    assert_eq!(best["round"], 1, "{summary}");
    assert_eq!(best["stopped_early_after"], 3, "{summary}");
    let kept = adapter(&inproc.join("adapter-best"));
    let round_one = adapter(&inproc.join("checkpoints/round-0001"));
    assert_eq!(
        max_abs_diff(&kept, &round_one),
        0.0,
        "round 1's adapter, bit for bit"
    );
    assert!(max_abs_diff(&kept, &adapter(&inproc.join("adapter"))) > 0.0);

    let out = over_nats(&config, dir.path());
    let summary = summary_of(&out);
    assert_eq!(summary["best"]["round"], 1, "{summary}");
    assert_eq!(summary["best"]["stopped_early_after"], 3);
    let served = adapter(&out.join("adapter-best"));
    assert!(max_abs_diff(&served, &kept) <= 1e-6);
}

/// A personalized (Ditto) course on a tiny model writes each client's own
/// adapter in PEFT's layout, and `[eval] tasks = ["loss"]` scores each on
/// its client's data: the loss the course measured with that adapter.
#[test]
fn personalized_courses_save_and_score_each_clients_own_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "rounds = 2", 2);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[pfl]\nalgorithm = \"ditto\"\n[eval]\ntasks = [\"loss\"]\n");
    std::fs::write(&config, text).unwrap();
    let out = in_process(&config, dir.path());
    let summary = summary_of(&out);
    let global = &summary["eval"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["task"] == "loss:test")
        .unwrap()["groups"];
    for c in summary["per_client"].as_array().unwrap() {
        let id = c["id"].as_u64().unwrap();
        let own = out.join(format!("adapter/client-{id}"));
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            assert!(own.join(f).is_file(), "client {id}: {f}");
        }
        let scored = c["own_adapter_eval"]["loss:test"].as_f64().unwrap();
        let in_course = c["test_loss_after"].as_f64().unwrap();
        assert!(
            (scored - in_course).abs() < 1e-4,
            "client {id}: {scored} from its saved adapter vs {in_course} in the course"
        );
        let with_global = global[format!("client {id}")]["score"].as_f64().unwrap();
        assert!(
            (scored - with_global).abs() > 1e-6,
            "client {id}: its own adapter ({scored}) is not the global one ({with_global})"
        );
    }
}

/// Reads every TFRecord of a TensorBoard event file, checking both CRCs of
/// each, and decodes each `Event`'s scalars with a generic protobuf wire
/// reader: `(tag, step, value)`, after the `file_version` event.
fn tensorboard_scalars(path: &Path) -> (String, Vec<(String, i64, f32)>) {
    use fedtune_kernel::tensorboard::masked_crc;
    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[*i];
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    /// Fields of one message: (number, wire type, bytes or value).
    fn fields(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut i = 0;
        let mut out = Vec::new();
        while i < b.len() {
            let key = varint(b, &mut i);
            let data = match key & 7 {
                0 => varint(b, &mut i).to_le_bytes().to_vec(),
                1 => {
                    i += 8;
                    b[i - 8..i].to_vec()
                }
                5 => {
                    i += 4;
                    b[i - 4..i].to_vec()
                }
                2 => {
                    let n = varint(b, &mut i) as usize;
                    i += n;
                    b[i - n..i].to_vec()
                }
                t => panic!("wire type {t}"),
            };
            out.push((key >> 3, data));
        }
        out
    }
    let bytes = std::fs::read(path).unwrap();
    let (mut i, mut version, mut scalars) = (0, String::new(), Vec::new());
    while i < bytes.len() {
        let len = &bytes[i..i + 8];
        assert_eq!(
            masked_crc(len).to_le_bytes(),
            bytes[i + 8..i + 12],
            "length CRC"
        );
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let data = &bytes[i + 12..i + 12 + n];
        assert_eq!(
            masked_crc(data).to_le_bytes(),
            bytes[i + 12 + n..i + 16 + n],
            "data CRC"
        );
        i += 16 + n;
        let event = fields(data);
        let step = event
            .iter()
            .find(|(f, _)| *f == 2)
            .map_or(0, |(_, v)| i64::from_le_bytes(v[..8].try_into().unwrap()));
        for (f, v) in &event {
            match f {
                3 => version = String::from_utf8(v.clone()).unwrap(),
                5 => {
                    for (_, value) in fields(v) {
                        let value = fields(&value);
                        let tag = String::from_utf8(value[0].1.clone()).unwrap();
                        let x = f32::from_le_bytes(value[1].1[..4].try_into().unwrap());
                        scalars.push((tag, step, x));
                    }
                }
                _ => {}
            }
        }
    }
    (version, scalars)
}

/// Every course writes TensorBoard scalars beside metrics.jsonl: read back
/// with CRC checks, they are the records' values at their rounds.
#[test]
fn a_course_writes_tensorboard_scalars_of_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_course(dir.path(), "rounds = 2", 2);
    let out = in_process(&config, dir.path());
    let files: Vec<PathBuf> = std::fs::read_dir(out.join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let (version, scalars) = tensorboard_scalars(&files[0]);
    assert_eq!(version, "brain.Event:2");
    let find = |tag: &str, step: i64| {
        scalars
            .iter()
            .find(|(t, s, _)| t == tag && *s == step)
            .unwrap_or_else(|| panic!("no {tag} at {step}"))
            .2
    };
    let mut checked = 0;
    for r in records(&out.join("metrics.jsonl")) {
        let round = r["round"].as_i64().unwrap();
        match (r["event"].as_str().unwrap(), r["client"].as_u64()) {
            ("eval", Some(c)) if r["split"] == "test" => {
                let want = r["loss"].as_f64().unwrap() as f32;
                assert_eq!(find(&format!("eval/test_loss/client_{c}"), round), want);
                checked += 1;
            }
            ("train", Some(c)) => {
                let want = r["extra"]["flops"].as_f64().unwrap() as f32;
                assert_eq!(find(&format!("train/flops/client_{c}"), round), want);
                checked += 1;
            }
            ("round", None) => {
                let want = r["bytes_up"].as_f64().unwrap() as f32;
                assert_eq!(find("round/bytes_up", round), want);
                checked += 1;
            }
            _ => {}
        }
    }
    // 3 clients × (3 evaluations + 2 trainings) + 2 rounds.
    assert_eq!(checked, 3 * 3 + 3 * 2 + 2);
}
