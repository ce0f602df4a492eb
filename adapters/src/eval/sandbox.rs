//! Runs untrusted Python (HumanEval completions) in a fresh `python3` process
//! per sample: its own temporary directory, an empty environment (no inherited
//! secrets; only `PATH` and a few Python switches), resource limits set with
//! `setrlimit` before the program runs (address space, CPU seconds, file size,
//! open files, processes), its own process group, and a wall-clock limit after
//! which the whole group is killed.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Limits of one sandboxed run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Wall-clock seconds before the process group is killed.
    pub timeout: Duration,
    /// Address-space limit in bytes.
    pub memory_bytes: u64,
    /// Most processes the sandboxed user may run (not enforced for root).
    pub processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            memory_bytes: 2 << 30,
            processes: 64,
        }
    }
}

/// How a program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Passed,
    /// Non-zero exit, with the tail of stderr.
    Failed(String),
    /// Killed at the wall-clock limit.
    TimedOut,
}

impl Outcome {
    /// Whether the program passed.
    pub fn passed(&self) -> bool {
        matches!(self, Outcome::Passed)
    }
}

/// The limits, applied by the interpreter to itself before the program runs.
fn prelude(limits: &Limits) -> String {
    let cpu = limits.timeout.as_secs().max(1) + 1;
    format!(
        "import resource as _r, sys as _s\n\
         def _lim(k, v):\n\
         \x20   try:\n\
         \x20       _r.setrlimit(k, (v, v))\n\
         \x20   except (ValueError, OSError):\n\
         \x20       pass\n\
         _lim(_r.RLIMIT_AS, {mem})\n\
         _lim(_r.RLIMIT_CPU, {cpu})\n\
         _lim(_r.RLIMIT_FSIZE, 1 << 24)\n\
         _lim(_r.RLIMIT_NOFILE, 64)\n\
         _lim(_r.RLIMIT_NPROC, {procs})\n\
         _lim(_r.RLIMIT_CORE, 0)\n\
         del _lim, _r, _s\n",
        mem = limits.memory_bytes,
        procs = limits.processes,
    )
}

/// Whether `python3` can be run here.
pub fn python_available() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `program` under `limits`.
pub fn run_python(program: &str, limits: &Limits) -> std::io::Result<Outcome> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fedtune-sandbox-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("program.py");
    let result = std::fs::write(&path, format!("{}{program}\n", prelude(limits)))
        .and_then(|()| run_in(&dir, &path, limits));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, script: &Path, limits: &Limits) -> std::io::Result<Outcome> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("python3")
        .arg("-I") // isolated: no user site, no PYTHON* variables, no cwd on sys.path
        .arg("-B")
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    // Drain stderr on a thread so a chatty program cannot block on a full pipe.
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.by_ref().take(1 << 20).read_to_end(&mut buf);
        // Keep reading (and dropping) whatever else comes.
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() >= limits.timeout {
            kill_group(child.id());
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Whatever the program left running in its group goes too.
    kill_group(child.id());
    let err = reader.join().unwrap_or_default();
    Ok(match status {
        None => Outcome::TimedOut,
        Some(s) if s.success() => Outcome::Passed,
        Some(s) => {
            let text = String::from_utf8_lossy(&err);
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Outcome::Failed(format!("{s}: {}", tail.join(" | ")))
        }
    })
}

/// SIGKILL to the process group `pgid` (the child made itself its leader).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Limits {
        Limits {
            timeout: Duration::from_secs(3),
            ..Limits::default()
        }
    }

    #[test]
    fn passes_fails_and_times_out() {
        if !python_available() {
            panic!("python3 is needed for the HumanEval sandbox (tests/run.sh installs it)");
        }
        assert_eq!(
            run_python("assert 1 + 1 == 2", &quick()).unwrap(),
            Outcome::Passed
        );
        match run_python("assert 1 + 1 == 3, 'math'", &quick()).unwrap() {
            Outcome::Failed(msg) => assert!(msg.contains("AssertionError: math"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let t = Instant::now();
        assert_eq!(
            run_python("while True:\n    pass", &quick()).unwrap(),
            Outcome::TimedOut
        );
        assert!(t.elapsed() < Duration::from_secs(6));
    }

    #[test]
    fn the_sandbox_has_no_secrets_and_little_memory() {
        std::env::set_var("FEDTUNE_TEST_SECRET", "hunter2");
        let prog = "import os\nassert 'FEDTUNE_TEST_SECRET' not in os.environ, 'leaked'";
        assert_eq!(run_python(prog, &quick()).unwrap(), Outcome::Passed);
        // 4 GiB in one piece is over the 2 GiB address-space limit.
        let hog = "x = bytearray(4 << 30)";
        match run_python(hog, &quick()).unwrap() {
            Outcome::Failed(msg) => assert!(msg.contains("MemoryError"), "{msg}"),
            other => panic!("{other:?}"),
        }
        // A child process left behind is killed with the group.
        let orphan = "import subprocess\nsubprocess.Popen(['sleep', '1234.5'])";
        assert_eq!(run_python(orphan, &quick()).unwrap(), Outcome::Passed);
        std::thread::sleep(Duration::from_millis(200));
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains("1234.5"));
        assert!(!left, "the orphaned sleep survived");
    }
}
