//! The HumanEval sandbox against a poisoned data file: a HumanEval-format
//! file whose tests try to escape (write outside the scratch directory, read
//! the home directory and the project, connect to a listener this test
//! opened, fork-bomb, fill the disk, read the host's `/proc`, `ptrace`).
//! Each test code passes only if its escape is refused. In the strict
//! sandbox every one passes with the right solution and fails with a wrong
//! one, and the host sees no effect; the basic sandbox (rlimits only) lets
//! the escapes through, which shows that the tests can fail.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedtune_adapters::eval::sandbox::{run_python, Limits, Mode, Outcome};
use fedtune_adapters::eval::tasks::{humaneval_program, load, Items, Task};
use fedtune_adapters::eval::GenItem;

/// The places an escape would touch on the host.
struct Targets {
    tmp_file: PathBuf,
    project_file: PathBuf,
    project: PathBuf,
    home: PathBuf,
    port: u16,
}

/// Test code that passes only if `attempt` raises `OSError`.
fn refused(name: &str, attempt: &str) -> String {
    format!(
        "    try:\n{attempt}\n    except OSError:\n        pass\n    else:\n        raise SystemExit('escaped: {name}')\n"
    )
}

fn escapes(t: &Targets) -> Vec<(&'static str, String)> {
    let pid = std::process::id();
    vec![
        (
            "write-tmp",
            refused(
                "write-tmp",
                &format!("        open('{}', 'w').write('x')", t.tmp_file.display()),
            ),
        ),
        (
            "write-project",
            refused(
                "write-project",
                &format!(
                    "        open('{}', 'w').write('x')",
                    t.project_file.display()
                ),
            ),
        ),
        (
            "read-home",
            refused(
                "read-home",
                &format!("        os.listdir('{}')", t.home.display()),
            ),
        ),
        (
            "read-project",
            refused(
                "read-project",
                &format!(
                    "        open('{}').read()",
                    t.project.join("Cargo.toml").display()
                ),
            ),
        ),
        (
            "connect",
            refused(
                "connect",
                &format!(
                    "        socket.create_connection(('127.0.0.1', {}), timeout=2).sendall(b'hi')",
                    t.port
                ),
            ),
        ),
        (
            "fork-bomb",
            refused(
                "fork-bomb",
                "        for _ in range(200):\n\
                 \x20           if os.fork() == 0:\n\
                 \x20               time.sleep(30)\n\
                 \x20               os._exit(0)",
            ),
        ),
        (
            "fill-disk",
            refused(
                "fill-disk",
                "        for i in range(64):\n\
                 \x20           with open(f'big{i}', 'wb') as f:\n\
                 \x20               f.write(b'x' * (1 << 20))",
            ),
        ),
        (
            "host-proc",
            format!(
                "    if len([p for p in os.listdir('/proc') if p.isdigit()]) > 10:\n\
                 \x20       raise SystemExit('escaped: host-proc sees the host processes')\n{}",
                refused(
                    "host-proc",
                    &format!("        open('/proc/{pid}/cmdline').read()")
                )
            ),
        ),
        (
            "ptrace",
            "    import ctypes\n\
             \x20   if ctypes.CDLL(None, use_errno=True).ptrace(0, 0, None, None) == 0:\n\
             \x20       raise SystemExit('escaped: ptrace')\n"
                .to_string(),
        ),
    ]
}

/// Writes the poisoned HumanEval file under `root` and loads it as
/// `fedtune eval humaneval --data-root ROOT` would.
fn poisoned_items(root: &Path, t: &Targets) -> Vec<GenItem> {
    let dir = root.join("humaneval");
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::create(dir.join("HumanEval.jsonl.gz")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    for (name, attempt) in escapes(t) {
        let test = format!(
            "import os, socket, time\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n    socket.socket(socket.AF_UNIX).close()\n{attempt}"
        );
        let record = serde_json::json!({
            "task_id": format!("Escape/{name}"),
            "prompt": "def add(a, b):\n",
            "canonical_solution": "    return a + b\n",
            "test": test,
            "entry_point": "add",
        });
        writeln!(gz, "{record}").unwrap();
    }
    gz.finish().unwrap();
    let Items::Gen { items, .. } = load(&Task::HumanEval, root, None).unwrap() else {
        panic!("humaneval is a generation task")
    };
    items
}

fn limits(mode: Mode) -> Limits {
    Limits {
        timeout: Duration::from_secs(8),
        mode,
        ..Limits::default()
    }
}

#[test]
fn a_poisoned_humaneval_file_cannot_escape_the_strict_sandbox() {
    let root = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let project = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let t = Targets {
        tmp_file: std::env::temp_dir().join(format!("fedtune-escape-{}", std::process::id())),
        project_file: project.join(format!("escape-{}", std::process::id())),
        project,
        home: PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())),
        port: listener.local_addr().unwrap().port(),
    };
    let items = poisoned_items(root.path(), &t);
    assert_eq!(items.len(), escapes(&t).len());
    let canonical = |i: &GenItem| i.extra["canonical_solution"].clone();

    // Strict: right solutions pass (every escape refused), wrong ones fail.
    for item in &items {
        let right = run_python(
            &humaneval_program(item, &canonical(item)),
            &limits(Mode::Strict),
        )
        .unwrap();
        assert_eq!(right, Outcome::Passed, "{}", item.id);
        let wrong = run_python(
            &humaneval_program(item, "    return a - b\n"),
            &limits(Mode::Strict),
        )
        .unwrap();
        match wrong {
            Outcome::Failed(m) => assert!(m.contains("AssertionError"), "{}: {m}", item.id),
            other => panic!("{}: {other:?}", item.id),
        }
    }
    assert!(
        !t.tmp_file.exists(),
        "a file was written to the host's temp dir"
    );
    assert!(
        !t.project_file.exists(),
        "a file was written to the project"
    );
    assert!(
        listener.accept().is_err(),
        "the loopback listener was reached"
    );

    // Basic: the same tests catch the escapes it lets through.
    let escaped: Vec<String> = items
        .iter()
        .filter_map(|item| {
            match run_python(
                &humaneval_program(item, &canonical(item)),
                &limits(Mode::Basic),
            )
            .unwrap()
            {
                Outcome::Failed(m) if m.contains("escaped") => Some(item.id.clone()),
                _ => None,
            }
        })
        .collect();
    let _ = std::fs::remove_file(&t.tmp_file);
    let _ = std::fs::remove_file(&t.project_file);
    // Run by someone who may not write the checkout, basic mode cannot either.
    let probe = t.project.join(format!("probe-{}", std::process::id()));
    let project_writable = std::fs::write(&probe, "x").is_ok();
    let _ = std::fs::remove_file(&probe);
    for id in [
        "write-tmp",
        if project_writable {
            "write-project"
        } else {
            "read-project"
        },
        "read-project",
        "connect",
        "fill-disk",
        "host-proc",
        "ptrace",
    ] {
        assert!(
            escaped.contains(&format!("Escape/{id}")),
            "basic mode stopped {id}? escaped: {escaped:?}"
        );
    }
}
