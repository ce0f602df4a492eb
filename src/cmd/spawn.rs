//! `fedtune run` with `[broker] transport = "nats"`: the server and every
//! client as separate processes of this binary (`fedtune server`,
//! `fedtune client`), against `[broker] url` or a nats-server started for
//! the run with a user per party.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fedtune_adapters::course::CourseFile;
use fedtune_broker::LocalNats;

use super::course_args::RunArgs;

/// A child process that is killed if still running when dropped.
struct Spawned {
    name: String,
    child: Child,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `fedtune run` with `[broker] transport = "nats"`: the server and every
/// client as separate processes of this binary, against `[broker] url` or a
/// nats-server started for the run with a user per party.
/// The run directory `out` is prepared (and locked) by the caller; the
/// server process is told so (`--managed`).
pub fn run_processes(course: &CourseFile, args: &RunArgs, out: &Path) -> Result<()> {
    let cfg = &course.cfg;
    let broker = &course.broker;
    let out = out.to_path_buf();
    // A broker of our own, with per-party users, unless one is given.
    let mut _local = None;
    let (url, creds_dir) = match &broker.url {
        Some(url) => (url.clone(), broker.credentials.clone()),
        None => {
            let dir = out.join("broker");
            let files = fedtune_broker::auth::write_config(
                &cfg.course.name,
                cfg.course.clients,
                ("127.0.0.1", 4222),
                &dir,
            )?;
            let nats = LocalNats::start(Some(&files.config))
                .context("starting a local nats-server for the run ([broker] url is unset)")?;
            let url = nats.url();
            _local = Some(nats);
            (url, Some(dir))
        }
    };
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let common = |cmd: &mut Command| {
        cmd.arg(&args.config);
        for s in &args.set {
            cmd.arg("--set").arg(s);
        }
        cmd.arg("--nats").arg(&url);
    };
    let log_file = |name: &str| -> Result<std::fs::File> {
        let path = out.join(format!("{name}.out"));
        std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))
    };
    let mut server = Command::new(&exe);
    server.arg("server");
    common(&mut server);
    server.arg("--out").arg(&out).arg("--managed");
    if args.resume {
        server.arg("--resume");
    }
    if let Some(root) = &args.data_root {
        server.arg("--data-root").arg(root);
    }
    if args.json {
        server.arg("--json");
    }
    if args.quiet {
        server.arg("--quiet");
    }
    if let Some(dir) = &creds_dir {
        server.arg("--creds").arg(dir.join("server.json"));
    }
    let mut server = Spawned {
        name: "server".into(),
        child: server
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start the server process")?,
    };
    let mut clients = Vec::new();
    for id in 1..=cfg.course.clients {
        let mut c = Command::new(&exe);
        c.arg("client");
        common(&mut c);
        c.arg("--id").arg(id.to_string());
        // What each client keeps between rounds survives its restart and
        // the course's --resume.
        c.arg("--state-dir").arg(out.join("client-state"));
        if let Some(root) = &args.data_root {
            c.arg("--data-root").arg(root);
        }
        if let Some(dir) = &creds_dir {
            c.arg("--creds").arg(dir.join(format!("client-{id}.json")));
        }
        let log = log_file(&format!("client-{id}"))?;
        c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        clients.push(Spawned {
            name: format!("client {id}"),
            child: c
                .spawn()
                .with_context(|| format!("cannot start client {id}"))?,
        });
    }
    wait_for_course(&mut server, &mut clients, &out)
}

/// Waits for the server's exit, which decides; a client that fails early is
/// reported while we wait, and clients get 30 s to end after the server.
fn wait_for_course(server: &mut Spawned, clients: &mut [Spawned], out: &Path) -> Result<()> {
    let mut reported = std::collections::BTreeSet::new();
    let status = loop {
        if let Some(status) = server.child.try_wait()? {
            break status;
        }
        for c in clients.iter_mut() {
            if let Some(st) = c.child.try_wait()? {
                if !st.success() && reported.insert(c.name.clone()) {
                    eprintln!(
                        "warning: {} exited with {st}; see {}",
                        c.name,
                        out.join(format!("{}.out", c.name.replace(' ', "-")))
                            .display()
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!(
            "the server process failed ({status}); see {}",
            out.join("server.log").display()
        );
    }
    // Clients end when the server's `finish` reaches them.
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in clients.iter_mut() {
        while c.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}
