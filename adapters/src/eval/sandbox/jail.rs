//! The box a sandboxed program runs in, built by its own child process
//! between `fork` and `exec` with what Linux gives unprivileged processes:
//!
//! 1. New user, mount, PID, network, IPC and UTS namespaces: the program is
//!    uid 1000 of a namespace of its own, with no network device but a
//!    loopback that is down (the host's loopback is not reachable), and its
//!    own PID 1.
//! 2. The child forks: the outer process only waits and passes the exit
//!    status on; the inner one is PID 1 of the new PID namespace, so when it
//!    ends the kernel kills every process the program left behind.
//! 3. A minimal root on a small tmpfs: the system's `/usr`, `/lib*`, `/bin`
//!    and the interpreter's own prefix bound read-only at their usual
//!    places, `/dev/{null,zero,random,urandom}`, a `/proc` showing only the
//!    box's processes, and `/work`, the one writable directory, a
//!    size-limited tmpfs. The host's root is detached: home directories,
//!    `/tmp`, the project and every other file are not there to open.
//! 4. Landlock ([`super::landlock`]) and the seccomp filter
//!    ([`super::seccomp`]), then `exec`.
//!
//! Run as root, the child builds the root (3) first, as root in a plain new
//! mount namespace (root's interpreter may live under a home directory
//! nobody else can enter), then becomes `nobody` before (1): root is exempt
//! from the process-count limit, and as `nobody` the program owns no file.
//!
//! Everything the child needs (paths, the BPF program) is prepared here
//! before the fork, so the child only makes system calls. A failing step
//! comes back to the spawner as an error code that names the step
//! ([`describe`]).

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::landlock::Ruleset;
use super::seccomp::{self, errno, Insn};

/// Where the new root is assembled (a fresh tmpfs over it, in the box's own
/// mount namespace: the host's `/tmp` is untouched).
const STAGE: &str = "/tmp";
/// The writable scratch directory inside the box.
pub const SCRATCH: &str = "/work";
/// The uid and gid the program has inside its user namespace.
const INNER_ID: u32 = 1000;
/// Who a root spawner's child becomes before entering its namespaces.
const NOBODY: u32 = 65534;
/// Host directories every box shows (read-only), when they exist.
const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin",
];
/// Host files every box shows (read-only), when they exist.
const SYSTEM_FILES: [&str; 1] = ["/etc/ld.so.cache"];
/// Device nodes every box shows.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];

/// The steps of building the box; a failure's error code is
/// `step * STEP_CODE + errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Step {
    DropPrivileges = 1,
    Unshare,
    IdMaps,
    Fork,
    PrivateMounts,
    StageRoot,
    MakePaths,
    Bind,
    ReadOnly,
    Proc,
    Scratch,
    PivotRoot,
    Landlock,
    Seccomp,
}

const STEP_CODE: i32 = 1000;

const STEPS: [(Step, &str); 14] = [
    (Step::DropPrivileges, "dropping root to nobody"),
    (
        Step::Unshare,
        "creating user, mount, PID, network and IPC namespaces",
    ),
    (Step::IdMaps, "writing the user namespace's id maps"),
    (Step::Fork, "forking the box's PID 1"),
    (Step::PrivateMounts, "making the mount namespace private"),
    (Step::StageRoot, "mounting the new root's tmpfs"),
    (Step::MakePaths, "creating mount points in the new root"),
    (Step::Bind, "binding a host directory read-only"),
    (Step::ReadOnly, "remounting a bound directory read-only"),
    (Step::Proc, "mounting the box's /proc"),
    (Step::Scratch, "mounting the scratch tmpfs"),
    (Step::PivotRoot, "switching to the new root"),
    (Step::Landlock, "applying the Landlock rules"),
    (Step::Seccomp, "installing the seccomp filter"),
];

fn fail(step: Step, errno: i32) -> io::Error {
    io::Error::from_raw_os_error(step as i32 * STEP_CODE + errno)
}

/// What a spawn error from a box means: the step that failed and why, or
/// `None` when the error did not come from building a box.
pub fn describe(err: &io::Error) -> Option<String> {
    let raw = err.raw_os_error()?;
    let step = raw / STEP_CODE;
    let (_, what) = STEPS.iter().find(|(s, _)| *s as i32 == step)?;
    Some(format!(
        "{what}: {}",
        io::Error::from_raw_os_error(raw % STEP_CODE)
    ))
}

/// The interpreter a box runs and the host directories it needs.
#[derive(Debug, Clone)]
pub struct Interpreter {
    /// The real executable (symlinks resolved).
    pub exe: PathBuf,
    /// Its prefixes and installation directory (canonical).
    pub roots: Vec<PathBuf>,
}

impl Interpreter {
    /// Asks `python3` (looked up in `path`) where it lives.
    pub fn find(path: &str) -> io::Result<Self> {
        let out = std::process::Command::new("python3")
            .args([
                "-I",
                "-c",
                "import os, sys\n\
                 for p in (sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):\n\
                 \x20   print(os.path.realpath(p))",
            ])
            .env_clear()
            .env("PATH", path)
            .stdin(std::process::Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "python3 could not report its paths: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().map(PathBuf::from);
        let exe = lines
            .next()
            .filter(|p| p.is_absolute())
            .ok_or_else(|| io::Error::other("python3 did not report its executable"))?;
        let mut roots: Vec<PathBuf> = lines.filter(|p| p.is_absolute()).collect();
        if let Some(install) = exe.parent().and_then(Path::parent) {
            roots.push(install.to_path_buf());
        }
        Ok(Self { exe, roots })
    }
}

/// A host path bound into the box.
struct Bind {
    /// The host path.
    source: CString,
    /// Where it goes, under the stage.
    target: CString,
    /// Directories are remounted read-only; device nodes keep their flags.
    read_only: bool,
}

/// Everything the child needs, prepared before the fork.
pub struct Jail {
    /// Build the root as root, then enter the namespaces as `nobody`.
    as_root: bool,
    uid_map: CString,
    gid_map: CString,
    stage_options: CString,
    scratch_options: CString,
    dirs: Vec<CString>,
    files: Vec<CString>,
    links: Vec<(CString, CString)>,
    binds: Vec<Bind>,
    stage: CString,
    stage_proc: CString,
    /// [`SCRATCH`], in the box and under the stage.
    scratch: CString,
    stage_scratch: CString,
    landlock: Option<Ruleset>,
    seccomp: Option<Vec<Insn>>,
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in the sandbox's own paths")
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("a NUL in the path {}", p.display())))
}

/// `path` under the stage.
fn staged(path: &Path) -> PathBuf {
    let mut out = PathBuf::from(STAGE);
    out.extend(
        path.components()
            .filter(|c| matches!(c, Component::Normal(_))),
    );
    out
}

impl Jail {
    /// Plans a box for `interpreter` with a `scratch_bytes` scratch
    /// directory; namespaces always, Landlock and seccomp when given.
    pub fn new(
        interpreter: &Interpreter,
        scratch_bytes: u64,
        landlock: Option<Ruleset>,
        seccomp: Option<Vec<Insn>>,
    ) -> io::Result<Self> {
        // SAFETY: plain id queries.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let as_root = euid == 0;
        let (outer_uid, outer_gid) = if as_root {
            (NOBODY, NOBODY)
        } else {
            (euid, egid)
        };
        // Root mounts the scratch directory for `nobody`.
        let owner = if as_root {
            format!(",uid={NOBODY},gid={NOBODY}")
        } else {
            String::new()
        };
        let mut plan = Self {
            as_root,
            uid_map: c(&format!("{INNER_ID} {outer_uid} 1\n")),
            gid_map: c(&format!("{INNER_ID} {outer_gid} 1\n")),
            stage_options: c("size=1m,mode=0755"),
            scratch_options: c(&format!("size={scratch_bytes},mode=0700{owner}")),
            dirs: Vec::new(),
            files: Vec::new(),
            links: Vec::new(),
            binds: Vec::new(),
            stage: c(STAGE),
            stage_proc: c_path(&staged(Path::new("/proc")))?,
            scratch: c(SCRATCH),
            stage_scratch: c_path(&staged(Path::new(SCRATCH)))?,
            landlock,
            seccomp,
        };
        plan.make_dirs(Path::new("/proc"))?;
        plan.make_dirs(Path::new(SCRATCH))?;
        // The system's directories: a top-level symlink (`/lib -> usr/lib`)
        // is made again as a link, a directory is bound.
        let mut shown: Vec<PathBuf> = Vec::new();
        for dir in SYSTEM_DIRS.iter().map(Path::new) {
            match std::fs::symlink_metadata(dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    let to = std::fs::read_link(dir)?;
                    plan.links.push((c_path(&to)?, c_path(&staged(dir))?));
                }
                Ok(m) if m.is_dir() => shown.push(dir.to_path_buf()),
                _ => {}
            }
        }
        for root in &interpreter.roots {
            let root = root.canonicalize()?;
            if root.parent().is_none() {
                continue; // never the whole host
            }
            // A root under a shown directory (or a link to one) is there already.
            let covered = shown.iter().any(|s| root.starts_with(s))
                || SYSTEM_DIRS.iter().any(|d| {
                    Path::new(d)
                        .canonicalize()
                        .is_ok_and(|real| real != Path::new(d) && root.starts_with(&real))
                });
            if !covered {
                shown.retain(|s| !s.starts_with(&root));
                shown.push(root);
            }
        }
        for dir in &shown {
            plan.bind(dir, true)?;
        }
        for file in SYSTEM_FILES.iter().map(Path::new).filter(|p| p.is_file()) {
            plan.bind(file, true)?;
        }
        for dev in DEVICES.iter().map(Path::new).filter(|p| p.exists()) {
            plan.bind(dev, false)?;
        }
        plan.links
            .push((c("/proc/self/fd"), c_path(&staged(Path::new("/dev/fd")))?));
        Ok(plan)
    }

    /// Plans the directories down to `path` (under the stage).
    fn make_dirs(&mut self, path: &Path) -> io::Result<()> {
        let mut at = PathBuf::from(STAGE);
        for part in path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
        {
            at.push(part);
            let dir = c_path(&at)?;
            if !self.dirs.contains(&dir) {
                self.dirs.push(dir);
            }
        }
        Ok(())
    }

    /// Plans binding the host's `path` at the same place in the box.
    fn bind(&mut self, path: &Path, read_only: bool) -> io::Result<()> {
        let target = staged(path);
        if path.is_dir() {
            self.make_dirs(path)?;
        } else {
            if let Some(parent) = path.parent() {
                self.make_dirs(parent)?;
            }
            self.files.push(c_path(&target)?);
        }
        self.binds.push(Bind {
            source: c_path(path)?,
            target: c_path(&target)?,
            read_only,
        });
        Ok(())
    }

    /// Builds the box around the calling process; on success the caller
    /// `exec`s the program. Runs between `fork` and `exec` (the spawner's
    /// `pre_exec`): async-signal-safe, no allocation.
    ///
    /// # Safety
    /// Only in a freshly forked child that will `exec` or `_exit`.
    pub unsafe fn enter(&self) -> io::Result<()> {
        if self.as_root {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(fail(Step::Unshare, errno()));
            }
            // With the host's /proc in the new root, the box may mount its
            // own over it (the kernel lets a user namespace mount a proc
            // only where one is fully visible).
            self.build_root()?;
            self.drop_to_nobody()?;
        }
        self.enter_namespaces()?;
        self.fork_pid_one()?;
        if self.as_root {
            mount_proc(c"/proc")?;
        } else {
            self.build_root()?;
        }
        if let Some(rules) = &self.landlock {
            let devices = [c"/dev/null"];
            rules
                .restrict_self(c"/", &self.scratch, &devices)
                .map_err(|e| fail(Step::Landlock, e))?;
        }
        if let Some(filter) = &self.seccomp {
            seccomp::install(filter).map_err(|e| fail(Step::Seccomp, e))?;
        }
        Ok(())
    }

    unsafe fn drop_to_nobody(&self) -> io::Result<()> {
        let ok = libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(NOBODY, NOBODY, NOBODY) == 0
            && libc::setresuid(NOBODY, NOBODY, NOBODY) == 0
            // Owning /proc/self again, to write the id maps.
            && libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) == 0;
        if !ok {
            return Err(fail(Step::DropPrivileges, errno()));
        }
        Ok(())
    }

    unsafe fn enter_namespaces(&self) -> io::Result<()> {
        let flags = libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        if libc::unshare(flags) != 0 {
            return Err(fail(Step::Unshare, errno()));
        }
        for (path, data) in [
            (c"/proc/self/setgroups", c"deny"),
            (c"/proc/self/uid_map", self.uid_map.as_c_str()),
            (c"/proc/self/gid_map", self.gid_map.as_c_str()),
        ] {
            write_file(path, data).map_err(|e| fail(Step::IdMaps, e))?;
        }
        Ok(())
    }

    /// Forks; the parent waits for the child (PID 1 of the new PID
    /// namespace) and exits with its status, the child returns.
    unsafe fn fork_pid_one(&self) -> io::Result<()> {
        let pid = libc::fork();
        if pid < 0 {
            return Err(fail(Step::Fork, errno()));
        }
        if pid > 0 {
            // Let the spawner's exec-status pipe close here: only the inner
            // process's `exec` (or its error report) should end the spawn.
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                for fd in 3..4096 {
                    libc::close(fd);
                }
            }
            let mut status = 0;
            loop {
                let r = libc::waitpid(pid, &mut status, 0);
                if r == pid {
                    break;
                }
                if r < 0 && errno() != libc::EINTR {
                    libc::_exit(125);
                }
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                125
            };
            libc::_exit(code);
        }
        // The inner process dies with the outer one (killed at the timeout).
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        Ok(())
    }

    unsafe fn build_root(&self) -> io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        if libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail(Step::PrivateMounts, errno()));
        }
        mount_tmpfs(&self.stage, &self.stage_options, Step::StageRoot)?;
        for dir in &self.dirs {
            if libc::mkdir(dir.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST {
                return Err(fail(Step::MakePaths, errno()));
            }
        }
        for file in &self.files {
            let fd = libc::open(
                file.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            );
            if fd < 0 {
                return Err(fail(Step::MakePaths, errno()));
            }
            libc::close(fd);
        }
        for (to, link) in &self.links {
            if libc::symlink(to.as_ptr(), link.as_ptr()) != 0 {
                return Err(fail(Step::MakePaths, errno()));
            }
        }
        for bind in &self.binds {
            if libc::mount(
                bind.source.as_ptr(),
                bind.target.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(fail(Step::Bind, errno()));
            }
            if bind.read_only {
                remount_read_only(&bind.target).map_err(|e| fail(Step::ReadOnly, e))?;
            }
        }
        mount_proc(&self.stage_proc)?;
        mount_tmpfs(&self.stage_scratch, &self.scratch_options, Step::Scratch)?;
        // pivot_root(".", ".") stacks the old root on the new one; detaching
        // it leaves the new root alone.
        let dot = c".";
        let ok = libc::chdir(self.stage.as_ptr()) == 0
            && libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0
            && libc::umount2(dot.as_ptr(), libc::MNT_DETACH) == 0
            && libc::chdir(c"/".as_ptr()) == 0;
        if !ok {
            return Err(fail(Step::PivotRoot, errno()));
        }
        if libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail(Step::ReadOnly, errno()));
        }
        if libc::chdir(self.scratch.as_ptr()) != 0 {
            return Err(fail(Step::PivotRoot, errno()));
        }
        Ok(())
    }
}

/// Mounts a tmpfs (nosuid, nodev) with `options` at `at`; a failure is `step`'s.
unsafe fn mount_tmpfs(at: &CStr, options: &CStr, step: Step) -> io::Result<()> {
    let tmpfs = c"tmpfs";
    if libc::mount(
        tmpfs.as_ptr(),
        at.as_ptr(),
        tmpfs.as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV,
        options.as_ptr().cast(),
    ) != 0
    {
        return Err(fail(step, errno()));
    }
    Ok(())
}

/// Mounts a proc of the caller's PID namespace at `at`.
unsafe fn mount_proc(at: &CStr) -> io::Result<()> {
    let proc_ = c"proc";
    if libc::mount(
        proc_.as_ptr(),
        at.as_ptr(),
        proc_.as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        std::ptr::null(),
    ) != 0
    {
        return Err(fail(Step::Proc, errno()));
    }
    Ok(())
}

/// Remounts the bind mount at `target` read-only, keeping the flags a user
/// namespace may not drop (noexec, atime); adds nosuid and nodev.
unsafe fn remount_read_only(target: &CStr) -> Result<(), i32> {
    let mut st: libc::statvfs = std::mem::zeroed();
    if libc::statvfs(target.as_ptr(), &mut st) != 0 {
        return Err(errno());
    }
    let mut flags =
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    for (st_flag, ms_flag) in [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    let none = std::ptr::null::<libc::c_char>();
    if libc::mount(none, target.as_ptr(), none, flags, std::ptr::null()) != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Writes `data` to the file `path`; async-signal-safe.
unsafe fn write_file(path: &CStr, data: &CStr) -> Result<(), i32> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(errno());
    }
    let bytes = data.to_bytes();
    let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
    let e = errno();
    libc::close(fd);
    if n != bytes.len() as isize {
        return Err(if n < 0 { e } else { libc::EIO });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_is_named_with_its_error() {
        let err = fail(Step::Unshare, libc::EPERM);
        let text = describe(&err).unwrap();
        assert!(text.starts_with("creating user, mount"), "{text}");
        assert!(text.contains("not permitted"), "{text}");
        assert_eq!(describe(&io::Error::from_raw_os_error(libc::ENOENT)), None);
        assert_eq!(STEPS.len(), Step::Seccomp as usize);
    }

    #[test]
    fn paths_are_staged_under_the_new_root() {
        assert_eq!(staged(Path::new("/usr/lib")), Path::new("/tmp/usr/lib"));
        assert_eq!(staged(Path::new("/")), Path::new("/tmp"));
    }
}
