//! Landlock, the kernel's unprivileged access control, as the sandbox's
//! second wall: after the child has moved into its minimal root, it may read
//! and execute anything there, write only under its scratch directory (and
//! to `/dev/null`), make no TCP connection and bind no TCP port (ABI 4+),
//! and neither signal processes nor reach abstract UNIX sockets outside its
//! domain (ABI 6+). Which rights exist depends on the kernel's Landlock
//! ABI; the set handled is exactly the one the running kernel knows.

use std::ffi::CStr;

use super::seccomp::errno;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;

// Filesystem rights (ABI 1 has the first 13; REFER came in 2, TRUNCATE in 3,
// IOCTL_DEV in 5).
const FS_EXECUTE: u64 = 1 << 0;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_READ_FILE: u64 = 1 << 2;
const FS_READ_DIR: u64 = 1 << 3;
const FS_ABI1: u64 = (1 << 13) - 1;
const FS_REFER: u64 = 1 << 13;
const FS_TRUNCATE: u64 = 1 << 14;
const FS_IOCTL_DEV: u64 = 1 << 15;
/// The rights a rule on a file (not a directory) may grant.
const FS_FILE: u64 = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV;

const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

/// `struct landlock_ruleset_attr` as of ABI 6.
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr`.
#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version the kernel offers, or why there is none.
pub fn abi() -> Result<u32, super::Lacking> {
    // SAFETY: the version query takes no pointer.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    match v {
        v if v >= 1 => Ok(v as u32),
        _ => Err(match errno() {
            libc::ENOSYS => "the kernel is older than 5.13 or built without Landlock".into(),
            libc::EOPNOTSUPP => {
                "Landlock is built in but not enabled (add `landlock` to the kernel's lsm= list)"
                    .into()
            }
            e => format!(
                "the version query failed: {}",
                std::io::Error::from_raw_os_error(e)
            )
            .into(),
        }),
    }
}

/// The rights handled under one ABI, computed before the fork.
#[derive(Debug, Clone, Copy)]
pub struct Ruleset {
    fs: u64,
    net: u64,
    scoped: u64,
    attr_size: usize,
}

impl Ruleset {
    /// Everything ABI `abi` can restrict.
    pub fn for_abi(abi: u32) -> Self {
        let mut fs = FS_ABI1;
        if abi >= 2 {
            fs |= FS_REFER;
        }
        if abi >= 3 {
            fs |= FS_TRUNCATE;
        }
        if abi >= 5 {
            fs |= FS_IOCTL_DEV;
        }
        let net = if abi >= 4 {
            NET_BIND_TCP | NET_CONNECT_TCP
        } else {
            0
        };
        let scoped = if abi >= 6 {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            0
        };
        let attr_size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => 24,
        };
        Self {
            fs,
            net,
            scoped,
            attr_size,
        }
    }

    /// Restricts the calling process: `readable` (a directory) read and
    /// execute, `writable` (a directory) everything, `devices` (files) read
    /// and write; nothing else, no TCP. Called between `fork` and `exec`:
    /// async-signal-safe, allocates nothing; returns the `errno` of a failure.
    pub fn restrict_self(
        &self,
        readable: &CStr,
        writable: &CStr,
        devices: &[&CStr],
    ) -> Result<(), i32> {
        let attr = RulesetAttr {
            handled_access_fs: self.fs,
            handled_access_net: self.net,
            scoped: self.scoped,
        };
        // SAFETY: system calls on valid pointers and descriptors we own.
        unsafe {
            let ruleset = libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                self.attr_size,
                0u32,
            );
            if ruleset < 0 {
                return Err(errno());
            }
            let ruleset = ruleset as i32;
            let read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR;
            let rules = [(readable, read), (writable, self.fs)];
            let devices = devices.iter().map(|d| {
                (
                    *d,
                    (FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE) & self.fs & FS_FILE,
                )
            });
            for (path, access) in rules.into_iter().chain(devices) {
                let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                if fd < 0 {
                    let e = errno();
                    libc::close(ruleset);
                    return Err(e);
                }
                let rule = PathBeneath {
                    allowed_access: access,
                    parent_fd: fd,
                };
                let r = libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset,
                    RULE_PATH_BENEATH,
                    &rule as *const PathBeneath,
                    0u32,
                );
                let e = errno();
                libc::close(fd);
                if r != 0 {
                    libc::close(ruleset);
                    return Err(e);
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) != 0
            {
                let e = errno();
                libc::close(ruleset);
                return Err(e);
            }
            libc::close(ruleset);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_abi_handles_what_it_knows() {
        let one = Ruleset::for_abi(1);
        assert_eq!(
            (one.fs, one.net, one.scoped, one.attr_size),
            (FS_ABI1, 0, 0, 8)
        );
        let four = Ruleset::for_abi(4);
        assert_eq!(four.fs, FS_ABI1 | FS_REFER | FS_TRUNCATE);
        assert_eq!(
            (four.net, four.attr_size),
            (NET_BIND_TCP | NET_CONNECT_TCP, 16)
        );
        let seven = Ruleset::for_abi(7);
        assert_eq!(seven.fs & FS_IOCTL_DEV, FS_IOCTL_DEV);
        assert_eq!((seven.scoped, seven.attr_size), (3, 24));
    }
}
