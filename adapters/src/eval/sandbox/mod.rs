//! Runs untrusted Python (HumanEval completions, and the tests of a data
//! file that may be poisoned) in a fresh `python3` per sample.
//!
//! In the default [`Mode::Strict`] each sample runs in a box ([`jail`]):
//! its own user, mount, PID, network and IPC namespaces, a minimal
//! read-only root holding the interpreter and the system's libraries, one
//! size-limited writable scratch directory, Landlock rules
//! ([`landlock`]) and a seccomp filter ([`seccomp`]) on top. What the box
//! stops and what it does not is the threat model in `docs/sandbox.md`.
//! [`Mode::Basic`] is the old sandbox: an empty environment and a temporary
//! directory, nothing more; the program runs with the user's rights.
//!
//! Both modes set resource limits (`setrlimit`: address space, CPU seconds,
//! file size, open files, processes) before the program runs, put it in its
//! own process group, and kill the group at a wall-clock limit.

mod jail;
mod landlock;
mod seccomp;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use jail::Interpreter;

/// Where `python3` is looked up, and the `PATH` a program sees.
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How much isolation a sample gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Namespaces, a minimal root, Landlock and seccomp; refuses to run
    /// where the kernel does not allow all of them.
    #[default]
    Strict,
    /// A temporary directory, an empty environment and rlimits only.
    Basic,
}

impl Mode {
    /// The mode's name as configs and `--sandbox` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Basic => "basic",
        }
    }
}

/// A sandbox mode name that is neither `strict` nor `basic`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown sandbox `{0}` (strict or basic)")]
pub struct UnknownMode(pub String);

impl std::str::FromStr for Mode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        match s {
            "strict" => Ok(Mode::Strict),
            "basic" => Ok(Mode::Basic),
            other => Err(UnknownMode(other.to_string())),
        }
    }
}

/// Why one protection cannot be had on this machine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Lacking(pub String);

impl From<String> for Lacking {
    fn from(why: String) -> Self {
        Self(why)
    }
}

impl From<&str> for Lacking {
    fn from(why: &str) -> Self {
        Self(why.to_string())
    }
}

/// Limits of one sandboxed run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Wall-clock seconds before the process group is killed.
    pub timeout: Duration,
    /// Address-space limit in bytes.
    pub memory_bytes: u64,
    /// Most processes the program may run (inside the box; in basic mode
    /// the user's, and not enforced for root).
    pub processes: u64,
    /// Size of the writable scratch directory (strict mode), and the
    /// largest file the program may write (both modes).
    pub scratch_bytes: u64,
    /// The isolation.
    pub mode: Mode,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            memory_bytes: 2 << 30,
            processes: 64,
            scratch_bytes: 16 << 20,
            mode: Mode::Strict,
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

/// Why the sandbox cannot run a program.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// python3 is missing or would not say where it lives.
    #[error("humaneval runs the generated code with python3, which cannot be used here ({0}); install it (apt-get install python3)")]
    NoPython(String),
    /// Strict mode, and the kernel refuses some protection.
    #[error("the strict sandbox cannot run here: {0}. Fix the system (see docs/sandbox.md), or run with `--sandbox basic` ([eval] sandbox = \"basic\"), where generated code runs with your rights: it can read your files and use the network")]
    Unavailable(String),
}

/// The protections this machine allows, found once per process by trying
/// each ([`Protections::detect`]).
#[derive(Debug, Clone)]
pub struct Protections {
    /// The interpreter and where it lives.
    pub interpreter: Result<Interpreter, Lacking>,
    /// User, mount, PID, network and IPC namespaces with the minimal root.
    pub namespaces: Result<(), Lacking>,
    /// Landlock, with the kernel's ABI version.
    pub landlock: Result<u32, Lacking>,
    /// The seccomp filter.
    pub seccomp: Result<(), Lacking>,
}

impl Protections {
    /// Tries each protection on a trivial program (once per process).
    pub fn detect() -> &'static Protections {
        static FOUND: OnceLock<Protections> = OnceLock::new();
        FOUND.get_or_init(|| {
            let interpreter = Interpreter::find(PATH).map_err(|e| Lacking(e.to_string()));
            let Ok(interp) = &interpreter else {
                let why = Lacking::from("no python3");
                return Protections {
                    interpreter,
                    namespaces: Err(why.clone()),
                    landlock: Err(why.clone()),
                    seccomp: Err(why),
                };
            };
            let probe = Limits {
                timeout: Duration::from_secs(10),
                ..Limits::default()
            };
            let try_box = |landlock, seccomp| -> Result<(), Lacking> {
                let jail = jail::Jail::new(interp, 1 << 20, landlock, seccomp)
                    .map_err(|e| Lacking(e.to_string()))?;
                match run_jailed(interp, jail, "pass", &probe) {
                    Ok(Outcome::Passed) => Ok(()),
                    Ok(other) => Err(Lacking(format!(
                        "a trivial program did not pass: {other:?}"
                    ))),
                    Err(e) => Err(Lacking(e.to_string())),
                }
            };
            let namespaces = try_box(None, None);
            let landlock = landlock::abi().and_then(|abi| {
                namespaces
                    .as_ref()
                    .map_err(|_| Lacking::from("needs the namespaces"))?;
                try_box(Some(landlock::Ruleset::for_abi(abi)), None).map(|()| abi)
            });
            let seccomp = seccomp::program().and_then(|filter| {
                namespaces
                    .as_ref()
                    .map_err(|_| Lacking::from("needs the namespaces"))?;
                try_box(None, Some(filter))
            });
            Protections {
                interpreter,
                namespaces,
                landlock,
                seccomp,
            }
        })
    }

    /// Each missing protection with the reason.
    pub fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = &self.namespaces {
            out.push(format!("namespaces ({e})"));
        }
        if let Err(e) = &self.landlock {
            out.push(format!("Landlock ({e})"));
        }
        if let Err(e) = &self.seccomp {
            out.push(format!("seccomp ({e})"));
        }
        out
    }
}

/// Checks that programs can run in `mode` and says how: the line to show
/// the user before an evaluation starts.
pub fn check(mode: Mode) -> Result<String, SandboxError> {
    let found = Protections::detect();
    let interp = found
        .interpreter
        .as_ref()
        .map_err(|e| SandboxError::NoPython(e.to_string()))?;
    match mode {
        Mode::Basic => Ok(format!(
            "warning: sandbox basic: generated code runs as you with {} (rlimits and a temporary directory only; it can read your files and use the network)",
            interp.exe.display()
        )),
        Mode::Strict => {
            let missing = found.missing();
            if !missing.is_empty() {
                return Err(SandboxError::Unavailable(format!(
                    "missing {}",
                    missing.join("; ")
                )));
            }
            Ok(format!(
                "sandbox strict: {} in user, mount, PID, network and IPC namespaces, a read-only minimal root, Landlock ABI {} and seccomp",
                interp.exe.display(),
                found.landlock.as_ref().copied().unwrap_or_default()
            ))
        }
    }
}

/// The limits, applied by the interpreter to itself before the program runs
/// (in strict mode after entering its namespaces, so the process count is
/// the box's own).
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
         _lim(_r.RLIMIT_FSIZE, {fsize})\n\
         _lim(_r.RLIMIT_NOFILE, 64)\n\
         _lim(_r.RLIMIT_NPROC, {procs})\n\
         _lim(_r.RLIMIT_CORE, 0)\n\
         del _lim, _r, _s\n",
        mem = limits.memory_bytes,
        fsize = limits.scratch_bytes,
        procs = limits.processes,
    )
}

/// Whether `python3` can be run here.
pub fn python_available() -> bool {
    Protections::detect().interpreter.is_ok()
}

/// Runs `program` under `limits`. In strict mode a machine that lacks a
/// protection is an error ([`check`] says which), never a weaker run.
pub fn run_python(program: &str, limits: &Limits) -> std::io::Result<Outcome> {
    match limits.mode {
        Mode::Basic => run_basic(program, limits),
        Mode::Strict => {
            let found = Protections::detect();
            let missing = found.missing();
            let interp = match (&found.interpreter, missing.is_empty()) {
                (Ok(interp), true) => interp,
                _ => return Err(std::io::Error::other(check(Mode::Strict).unwrap_err())),
            };
            let abi = found.landlock.as_ref().copied().unwrap_or(1);
            let filter = seccomp::program().map_err(std::io::Error::other)?;
            let jail = jail::Jail::new(
                interp,
                limits.scratch_bytes,
                Some(landlock::Ruleset::for_abi(abi)),
                Some(filter),
            )?;
            run_jailed(interp, jail, program, limits)
        }
    }
}

/// Runs `program` (read by python from its stdin) inside `jail`.
fn run_jailed(
    interp: &Interpreter,
    jail: jail::Jail,
    program: &str,
    limits: &Limits,
) -> std::io::Result<Outcome> {
    let mut command = Command::new(&interp.exe);
    command
        .args(["-I", "-B", "-"])
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", jail::SCRATCH)
        .env("TMPDIR", jail::SCRATCH)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: `enter` makes only async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || jail.enter());
    }
    let mut child = command.spawn().map_err(|e| match jail::describe(&e) {
        Some(why) => std::io::Error::other(format!("the sandbox could not be built: {why}")),
        None => e,
    })?;
    // The box's descriptors close with the command.
    drop(command);
    let mut stdin = child.stdin.take().expect("piped");
    let text = format!("{}{program}\n", prelude(limits));
    // A program that stops reading (it cannot, before it starts) must not
    // hold the timeout up: write on a thread.
    std::thread::spawn(move || {
        let _ = stdin.write_all(text.as_bytes());
    });
    supervise(child, limits)
}

/// Runs `program` as the user, in a temporary directory.
fn run_basic(program: &str, limits: &Limits) -> std::io::Result<Outcome> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fedtune-sandbox-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("program.py");
    let result = std::fs::write(&path, format!("{}{program}\n", prelude(limits)))
        .and_then(|()| spawn_basic(&dir, &path))
        .and_then(|child| supervise(child, limits));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn spawn_basic(dir: &Path, script: &Path) -> std::io::Result<Child> {
    Command::new("python3")
        .arg("-I") // isolated: no user site, no PYTHON* variables, no cwd on sys.path
        .arg("-B")
        .arg(script)
        .current_dir(dir)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
}

/// Waits for `child` up to the time limit, then kills its process group;
/// the outcome with the tail of stderr.
fn supervise(mut child: Child, limits: &Limits) -> std::io::Result<Outcome> {
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
        std::thread::sleep(Duration::from_millis(2));
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
    // SAFETY: kill(2) with a negative pid signals a process group.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(mode: Mode) -> Limits {
        Limits {
            timeout: Duration::from_secs(3),
            mode,
            ..Limits::default()
        }
    }

    #[test]
    fn passes_fails_and_times_out_in_both_modes() {
        assert!(
            python_available(),
            "python3 is needed for the HumanEval sandbox (tests/run.sh installs it)"
        );
        for mode in [Mode::Strict, Mode::Basic] {
            let limits = quick(mode);
            assert_eq!(
                run_python("assert 1 + 1 == 2", &limits).unwrap(),
                Outcome::Passed
            );
            match run_python("assert 1 + 1 == 3, 'math'", &limits).unwrap() {
                Outcome::Failed(msg) => assert!(msg.contains("AssertionError: math"), "{msg}"),
                other => panic!("{mode:?}: {other:?}"),
            }
            let t = Instant::now();
            assert_eq!(
                run_python("while True:\n    pass", &limits).unwrap(),
                Outcome::TimedOut
            );
            assert!(t.elapsed() < Duration::from_secs(6));
        }
    }

    #[test]
    fn this_machine_allows_every_protection() {
        // CI's machines do; a failure here names the one the kernel refused.
        let found = Protections::detect();
        assert_eq!(found.missing(), Vec::<String>::new());
        assert!(check(Mode::Strict).unwrap().contains("Landlock ABI"));
        assert!(check(Mode::Basic).unwrap().starts_with("warning"));
    }

    #[test]
    fn the_sandbox_has_no_secrets_and_little_memory() {
        std::env::set_var("FEDTUNE_TEST_SECRET", "hunter2");
        for mode in [Mode::Strict, Mode::Basic] {
            let limits = quick(mode);
            let prog = "import os\nassert 'FEDTUNE_TEST_SECRET' not in os.environ, 'leaked'";
            assert_eq!(run_python(prog, &limits).unwrap(), Outcome::Passed);
            // 4 GiB in one piece is over the 2 GiB address-space limit.
            let hog = "x = bytearray(4 << 30)";
            match run_python(hog, &limits).unwrap() {
                Outcome::Failed(msg) => assert!(msg.contains("MemoryError"), "{msg}"),
                other => panic!("{mode:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn processes_left_behind_are_killed_even_in_a_new_session() {
        // setsid() leaves the process group; only the box's PID namespace
        // catches such a process, so this holds in strict mode.
        let marker = format!(
            "{}.{}",
            1000 + std::process::id() % 1000,
            std::process::id()
        );
        let orphan = format!(
            "import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)"
        );
        assert_eq!(
            run_python(&orphan, &quick(Mode::Strict)).unwrap(),
            Outcome::Passed
        );
        std::thread::sleep(Duration::from_millis(300));
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains(&marker));
        assert!(!left, "the orphaned sleep survived");
    }

    #[test]
    fn inside_the_box_the_filter_and_the_walls_hold() {
        // Each line fails (and names itself) if its layer is missing: a new
        // user namespace and an AF_INET socket are allowed to an
        // unprivileged process, refused only by the filter.
        let prog = "import ctypes, errno, os, socket\n\
            libc = ctypes.CDLL(None, use_errno=True)\n\
            assert os.getuid() == 1000 and os.getcwd() == '/work', 'identity'\n\
            try:\n    socket.socket(socket.AF_INET)\n    raise SystemExit('inet socket made')\n\
            except OSError as e:\n    assert e.errno == errno.EAFNOSUPPORT, e\n\
            socket.socket(socket.AF_UNIX).close()\n\
            assert libc.unshare(0x10000000) == -1 and ctypes.get_errno() == errno.EPERM, 'unshare'\n\
            assert libc.ptrace(0, 0, None, None) == -1 and ctypes.get_errno() == errno.EPERM, 'ptrace'\n\
            assert sorted(os.listdir('/')) == sorted(set(os.listdir('/')) & {'bin', 'dev', 'etc', 'lib', 'lib32', 'lib64', 'libx32', 'proc', 'root', 'sbin', 'usr', 'work', 'home', 'opt'}), os.listdir('/')\n\
            try:\n    open('/usr/escape', 'w')\n    raise SystemExit('wrote /usr')\n\
            except OSError:\n    pass\n\
            open('/work/ok', 'w').write('fine')\n";
        match run_python(prog, &quick(Mode::Strict)).unwrap() {
            Outcome::Passed => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn modes_parse_and_unknown_ones_are_named() {
        assert_eq!("strict".parse::<Mode>().unwrap(), Mode::Strict);
        assert_eq!("basic".parse::<Mode>().unwrap(), Mode::Basic);
        let err = "docker".parse::<Mode>().unwrap_err().to_string();
        assert!(
            err.contains("`docker`") && err.contains("strict or basic"),
            "{err}"
        );
    }
}
