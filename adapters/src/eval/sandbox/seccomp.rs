//! The sandbox's system-call filter: a classic-BPF seccomp program that
//! refuses the calls a Python test program has no business making —
//! debugging other processes, mounting, kernel keys and modules, BPF,
//! performance counters, new namespaces — and every socket but `AF_UNIX`.
//! Refused calls fail with an error (`EPERM`, or `EAFNOSUPPORT` for sockets)
//! so the program sees an ordinary `OSError`; a call made under another
//! architecture's numbering kills the process.
//!
//! The program is built before the sandbox forks and installed by the child
//! just before `exec` (installing it allocates nothing).

/// One classic-BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// `struct sock_fprog`.
#[repr(C)]
struct Prog {
    len: u16,
    filter: *const Insn,
}

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;

// Offsets in `struct seccomp_data`: nr, arch, instruction pointer, args.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of the first argument (little-endian).
const OFF_ARG0_LO: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// `clone` flags that make new namespaces.
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// Calls refused with `EPERM`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn refused() -> Vec<libc::c_long> {
    let mut calls = vec![
        // Other processes' memory and file descriptors.
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_process_madvise,
        libc::SYS_kcmp,
        // Mounts and the filesystem tree.
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_quotactl,
        libc::SYS_acct,
        // Namespaces.
        libc::SYS_unshare,
        libc::SYS_setns,
        // The kernel itself: keys, modules, BPF, counters, clocks, reboot.
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_syslog,
        libc::SYS_reboot,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS_modify_ldt,
    ]);
    calls
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// The filter, or why this architecture has none.
pub fn program() -> Result<Vec<Insn>, super::Lacking> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let mut p = vec![
            stmt(LD_W_ABS, OFF_ARCH),
            jump(JEQ_K, AUDIT_ARCH, 1, 0),
            stmt(RET_K, RET_KILL_PROCESS),
            stmt(LD_W_ABS, OFF_NR),
        ];
        // x32 calls share x86_64's architecture tag, with bit 30 set.
        #[cfg(target_arch = "x86_64")]
        p.extend([jump(JGE_K, 0x4000_0000, 0, 1), stmt(RET_K, eperm)]);
        for nr in refused() {
            p.extend([jump(JEQ_K, nr as u32, 0, 1), stmt(RET_K, eperm)]);
        }
        // glibc falls back to `clone`, whose flags a filter can see.
        p.extend([
            jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1),
            stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32),
        ]);
        p.extend([
            jump(JEQ_K, libc::SYS_socket as u32, 0, 4),
            stmt(LD_W_ABS, OFF_ARG0_LO),
            jump(JEQ_K, libc::AF_UNIX as u32, 0, 1),
            stmt(RET_K, RET_ALLOW),
            stmt(RET_K, RET_ERRNO | libc::EAFNOSUPPORT as u32),
        ]);
        p.extend([
            jump(JEQ_K, libc::SYS_clone as u32, 0, 4),
            stmt(LD_W_ABS, OFF_ARG0_LO),
            jump(JSET_K, NAMESPACE_FLAGS, 0, 1),
            stmt(RET_K, eperm),
            stmt(RET_K, RET_ALLOW),
        ]);
        p.push(stmt(RET_K, RET_ALLOW));
        Ok(p)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Err(super::Lacking(format!(
            "no filter is written for {}",
            std::env::consts::ARCH
        )))
    }
}

/// Installs `program` on the calling thread, for good. Called in the
/// sandbox's child between `fork` and `exec`: async-signal-safe, allocates
/// nothing; returns the `errno` of a failure.
pub fn install(program: &[Insn]) -> Result<(), i32> {
    let prog = Prog {
        len: program.len() as u16,
        filter: program.as_ptr(),
    };
    // SAFETY: plain system calls; `prog` points at `program`, alive here.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(errno());
        }
        if libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const Prog,
        ) != 0
        {
            return Err(errno());
        }
    }
    Ok(())
}

/// The calling thread's `errno`.
pub(super) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program_and_it_ends_in_a_return() {
        let p = program().unwrap();
        assert!(p.len() < u16::MAX as usize);
        for (i, insn) in p.iter().enumerate() {
            if insn.code & 0x07 == 0x05 {
                assert!(i + 1 + (insn.jt as usize) < p.len(), "jt of {i} leaves");
                assert!(i + 1 + (insn.jf as usize) < p.len(), "jf of {i} leaves");
            }
        }
        assert_eq!(p.last().unwrap().code, RET_K);
        assert_eq!(p.last().unwrap().k, RET_ALLOW);
    }
}
