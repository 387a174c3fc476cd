//! The agent's system-call filter: a classic BPF program built here, so that every rule is visible
//! in one place and the x32 and foreign-architecture holes that deny-lists usually leave are shut.
//!
//! The filter allows by default and refuses what a confined agent has no use for: calls that
//! reach the kernel's attack surface (bpf, io_uring, userfaultfd, perf_event_open, keyctl), calls
//! that inspect or steer other processes (ptrace, process_vm_*), calls that change the sandbox
//! itself once it is built (mount, pivot_root, setns, unshare, namespace flags to clone), and
//! sockets that bypass the loopback-only network (raw, packet, vsock, netlink other than routing
//! reads). Refusals return `EPERM`, so programs fail cleanly instead of dying mid-write.
//! A call from another architecture's ABI (i386, x32 on x86_64) kills the process: those numbers
//! mean different calls and would slip past every rule.
//!
//! The rules are compiled by Firecracker's `seccompiler`, and installed as three filters, each
//! for what that compiler can or cannot say. It cannot compare a system-call number except for
//! equality, so the x32 check (a number with bit 30 set, on the native architecture) is a
//! five-instruction program written here; and one compiled filter has one action for every
//! rule, so the calls refused with `EPERM` and those reported missing with `ENOSYS` are two
//! filters. The kernel runs every filter and keeps the strictest answer (kill, then an error,
//! then allow), which is exactly what the one hand-built program did.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// A compiled filter, ready to install: programs installed in order, all of which the kernel
/// runs on every call.
#[derive(Debug, Clone)]
pub struct Filter {
    programs: Vec<BpfProgram>,
}

/// Why the rule table did not compile (a bug in the table, caught by this module's tests).
#[derive(Debug, thiserror::Error)]
#[error("seccomp rules do not compile: {0}")]
pub struct CompileError(#[from] seccompiler::BackendError);

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
#[cfg(target_arch = "x86_64")]
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
#[cfg(test)]
const RET_ERRNO: u32 = 0x0005_0000;

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

#[cfg(target_arch = "x86_64")]
const TARGET: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET: TargetArch = TargetArch::aarch64;

/// x32 system calls arrive with the native architecture and this bit set in the number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Every `CLONE_NEW*` flag: a clone that makes a namespace is refused.
const CLONE_NEW_MASK: u32 = 0x7E02_0080;
/// `MFD_EXEC`: an executable memfd is how fileless binaries start.
const MFD_EXEC: u32 = 0x0010;
const TIOCSTI: u32 = 0x5412;
const TIOCLINUX: u32 = 0x541C;
const SOCK_TYPE_MASK: u32 = 0xf;
/// `S_ISUID | S_ISGID`: a file the agent makes or changes never gets them. (Started by root,
/// the agent's files in the workspace belong to root on the host, through the idmapped mount.)
const SET_ID_BITS: u32 = 0o6000;
/// `fchmodat2` (Linux 6.6), which the libc crate may not name on every target.
const SYS_FCHMODAT2: libc::c_long = 452;
const SOCK_PACKET: u32 = 10;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// System calls refused outright.
fn denied() -> Vec<libc::c_long> {
    let mut v = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_bpf,
        libc::SYS_userfaultfd,
        libc::SYS_perf_event_open,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_kcmp,
        libc::SYS_pidfd_getfd,
        libc::SYS_lookup_dcookie,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS_modify_ldt,
    ]);
    v
}

/// Calls that take a file mode, and which argument holds it.
fn mode_args() -> Vec<(libc::c_long, u32)> {
    let mut v = vec![
        (libc::SYS_fchmod, 1),
        (libc::SYS_fchmodat, 2),
        (SYS_FCHMODAT2, 2),
        (libc::SYS_openat, 3),
        (libc::SYS_mknodat, 2),
        (libc::SYS_mkdirat, 2),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        (libc::SYS_chmod, 1),
        (libc::SYS_open, 2),
        (libc::SYS_creat, 1),
        (libc::SYS_mknod, 1),
        (libc::SYS_mkdir, 1),
    ]);
    v
}

/// The low 32 bits of argument `arg`, compared with `op` to `value` (the hand-built program
/// read the same half; the kernel ignores the upper half of every argument checked here).
fn arg(arg: u8, op: SeccompCmpOp, value: u32) -> Result<SeccompCondition, CompileError> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        u64::from(value),
    )?)
}

/// Rules that match when any bit of `mask` is set in argument `a`: one rule per bit, since a
/// compiled condition compares the masked value for equality only.
fn any_bit(a: u8, mask: u32) -> Result<Vec<SeccompRule>, CompileError> {
    (0..32)
        .map(|b| 1u32 << b)
        .filter(|bit| mask & bit != 0)
        .map(|bit| {
            let c = arg(a, SeccompCmpOp::MaskedEq(u64::from(bit)), bit)?;
            Ok(SeccompRule::new(vec![c])?)
        })
        .collect()
}

/// The `EPERM` rules: by call, the argument conditions under which it is refused (an empty
/// list refuses it whatever its arguments).
fn refused(deny_memfd: bool) -> Result<BTreeMap<i64, Vec<SeccompRule>>, CompileError> {
    use SeccompCmpOp::{Eq, MaskedEq, Ne};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for n in denied() {
        rules.insert(n, Vec::new());
    }
    // clone(flags, ...): no new namespaces.
    rules.insert(libc::SYS_clone, any_bit(0, CLONE_NEW_MASK)?);
    // memfd_create(name, flags): never executable (or not at all).
    let memfd = if deny_memfd {
        Vec::new()
    } else {
        any_bit(1, MFD_EXEC)?
    };
    rules.insert(libc::SYS_memfd_create, memfd);
    // No set-user-ID or set-group-ID bit, by chmod or at creation: (call, mode argument).
    for (call, a) in mode_args() {
        let a = u8::try_from(a).map_err(|_| seccompiler::BackendError::InvalidArgumentNumber)?;
        rules.insert(call, any_bit(a, SET_ID_BITS)?);
    }
    // ioctl(fd, request): no typing into the controlling terminal.
    rules.insert(
        libc::SYS_ioctl,
        vec![
            SeccompRule::new(vec![arg(1, Eq, TIOCSTI)?])?,
            SeccompRule::new(vec![arg(1, Eq, TIOCLINUX)?])?,
        ],
    );
    // socket(domain, type, protocol) and socketpair alike: no packet or vsock sockets, no
    // netlink but routing (enough to read one's own interfaces and addresses; the kernel
    // refuses changes to them, as the agent holds no capability), and outside netlink no raw
    // or packet types.
    let netlink = libc::AF_NETLINK as u32;
    for call in [libc::SYS_socket, libc::SYS_socketpair] {
        let mut r = vec![
            SeccompRule::new(vec![arg(0, Eq, libc::AF_PACKET as u32)?])?,
            SeccompRule::new(vec![arg(0, Eq, libc::AF_VSOCK as u32)?])?,
            SeccompRule::new(vec![
                arg(0, Eq, netlink)?,
                arg(2, Ne, libc::NETLINK_ROUTE as u32)?,
            ])?,
        ];
        for ty in [libc::SOCK_RAW as u32, SOCK_PACKET] {
            r.push(SeccompRule::new(vec![
                arg(0, Ne, netlink)?,
                arg(1, MaskedEq(u64::from(SOCK_TYPE_MASK)), ty)?,
            ])?);
        }
        rules.insert(call, r);
    }
    Ok(rules)
}

/// The calls reported missing (`ENOSYS`): they pass their flags or mode in memory the filter
/// cannot read, so the C library falls back to clone and openat, whose arguments are checked.
fn missing() -> BTreeMap<i64, Vec<SeccompRule>> {
    [libc::SYS_clone3, libc::SYS_openat2]
        .into_iter()
        .map(|n| (n, Vec::new()))
        .collect()
}

/// Kills a call from another architecture's ABI, and on x86_64 any x32 call: what seccompiler
/// cannot express, since it compares call numbers for equality only.
fn foreign_abis() -> BpfProgram {
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
    ];
    #[cfg(target_arch = "x86_64")]
    {
        p.push(stmt(LD_W_ABS, OFF_NR));
        p.push(jump(JGE_K, X32_SYSCALL_BIT, 0, 1));
        p.push(stmt(RET_K, RET_KILL_PROCESS));
    }
    p.push(stmt(RET_K, RET_ALLOW));
    p
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, CompileError> {
    let errno =
        u32::try_from(errno).map_err(|_| seccompiler::BackendError::InvalidArgumentNumber)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        TARGET,
    )?;
    Ok(filter.try_into()?)
}

impl Filter {
    /// The agent filter for the architecture this binary was built for. `deny_memfd` refuses
    /// memfd_create entirely, for kernels that cannot make memory files non-executable.
    pub fn agent(deny_memfd: bool) -> Filter {
        // The table is fixed at build time and every arm of it is compiled by the tests below;
        // a failure here is a bug in it, never a property of the input.
        #[allow(clippy::expect_used)]
        Filter::compile(deny_memfd).expect("the seccomp rule table compiles")
    }

    /// The agent filter, or why its rule table does not compile.
    pub fn compile(deny_memfd: bool) -> Result<Filter, CompileError> {
        Ok(Filter {
            programs: vec![
                foreign_abis(),
                compile(refused(deny_memfd)?, libc::EPERM)?,
                compile(missing(), libc::ENOSYS)?,
            ],
        })
    }

    /// How many instructions the largest program has (the kernel allows 4096 a program).
    pub fn len(&self) -> usize {
        self.programs.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Whether the filter is empty (never, for a built filter).
    pub fn is_empty(&self) -> bool {
        self.programs.iter().all(Vec::is_empty)
    }

    /// Installs the filter on the calling thread and every child it starts. Sets
    /// `no_new_privs` (seccompiler does, before each program), which the sandbox init has set
    /// already (`init.rs`, before Landlock and this filter).
    pub fn install(&self) -> io::Result<()> {
        for p in &self.programs {
            seccompiler::apply_filter(p).map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JA: u16 = 0x05; // BPF_JMP | BPF_JA
    const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
    const JGE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K

    /// A tiny interpreter for the classic BPF that the compiled and the hand-written programs
    /// use, so the filter's decisions are tested without installing it: a cross-check of what
    /// seccompiler emits against what the rules mean.
    fn run_one(program: &[sock_filter], arch: u32, nr: u32, args: [u32; 6]) -> u32 {
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = &program[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    acc = match i.k {
                        0 => nr,
                        4 => arch,
                        // Low halves of the arguments; the high halves of these tests' are 0.
                        k if k >= 16 && (k - 16) % 8 == 0 => args[((k - 16) / 8) as usize],
                        k if k >= 20 && (k - 20) % 8 == 0 => 0,
                        k => panic!("load from {k}"),
                    }
                }
                JEQ_K | JGE | JGT_K | JSET_K => {
                    let hit = match i.code {
                        JEQ_K => acc == i.k,
                        JGE => acc >= i.k,
                        JGT_K => acc > i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                JA => pc += i.k as usize,
                AND_K => acc &= i.k,
                RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    /// Every program's answer, the strictest kept, as the kernel does (the action bits read as
    /// a signed number: the lowest wins).
    fn run(f: &Filter, arch: u32, nr: u32, args: [u32; 6]) -> u32 {
        f.programs
            .iter()
            .map(|p| run_one(p, arch, nr, args))
            .min_by_key(|r| (r & 0xffff_0000) as i32)
            .expect("a filter has programs")
    }

    fn call(nr: libc::c_long, args: [u32; 6]) -> u32 {
        run(&Filter::agent(false), AUDIT_ARCH, nr as u32, args)
    }

    const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn ordinary_calls_pass() {
        for n in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_exit_group,
        ] {
            assert_eq!(call(n, [0; 6]), RET_ALLOW, "{n}");
        }
        assert_eq!(
            call(
                libc::SYS_socket,
                [libc::AF_INET as u32, libc::SOCK_STREAM as u32, 0, 0, 0, 0]
            ),
            RET_ALLOW
        );
        assert_eq!(
            call(
                libc::SYS_socket,
                [libc::AF_UNIX as u32, libc::SOCK_DGRAM as u32, 0, 0, 0, 0]
            ),
            RET_ALLOW
        );
        assert_eq!(
            call(
                libc::SYS_socket,
                [
                    libc::AF_NETLINK as u32,
                    libc::SOCK_RAW as u32,
                    libc::NETLINK_ROUTE as u32,
                    0,
                    0,
                    0
                ]
            ),
            RET_ALLOW,
            "reading one's own interfaces needs a raw routing-netlink socket"
        );
        assert_eq!(
            call(libc::SYS_clone, [0x01200011, 0, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(call(libc::SYS_memfd_create, [0, 1, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(call(libc::SYS_ioctl, [1, 0x5401, 0, 0, 0, 0]), RET_ALLOW);
    }

    #[test]
    fn set_id_bits_are_refused_and_ordinary_modes_pass() {
        for (n, arg) in mode_args() {
            let with = |mode: u32| {
                let mut a = [3u32, 0, 0, 0, 0, 0];
                a[arg as usize] = mode;
                call(n, a)
            };
            assert_eq!(with(0o755), RET_ALLOW, "{n} 0755");
            assert_eq!(with(0o1777), RET_ALLOW, "{n} sticky");
            assert_eq!(with(0o4755), EPERM, "{n} setuid");
            assert_eq!(with(0o2755), EPERM, "{n} setgid");
            assert_eq!(with(0o104755), EPERM, "{n} S_IFREG|setuid");
        }
        assert_eq!(
            call(libc::SYS_openat2, [0; 6]),
            RET_ERRNO | libc::ENOSYS as u32
        );
        // A plain openat with no mode passes (glibc passes 0 without O_CREAT).
        assert_eq!(
            call(libc::SYS_openat, [3, 0, libc::O_RDONLY as u32, 0, 0, 0]),
            RET_ALLOW
        );
    }

    #[test]
    fn escapes_are_refused() {
        for n in [
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_io_uring_setup,
            libc::SYS_keyctl,
            libc::SYS_process_vm_readv,
        ] {
            assert_eq!(call(n, [0; 6]), EPERM, "{n}");
        }
        assert_eq!(
            call(libc::SYS_clone3, [0; 6]),
            RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(
            call(libc::SYS_clone, [libc::CLONE_NEWUSER as u32, 0, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(
            call(
                libc::SYS_clone,
                [libc::CLONE_NEWNET as u32 | 17, 0, 0, 0, 0, 0]
            ),
            EPERM
        );
        assert_eq!(
            call(libc::SYS_memfd_create, [0, MFD_EXEC, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(call(libc::SYS_ioctl, [0, TIOCSTI, 0, 0, 0, 0]), EPERM);
        for (domain, ty, proto) in [
            (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
            (libc::AF_INET6, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0),
            (libc::AF_PACKET, libc::SOCK_DGRAM, 0),
            (libc::AF_VSOCK, libc::SOCK_STREAM, 0),
            (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_AUDIT),
            (libc::AF_INET, SOCK_PACKET as i32, 0),
        ] {
            for n in [libc::SYS_socket, libc::SYS_socketpair] {
                assert_eq!(
                    call(n, [domain as u32, ty as u32, proto as u32, 0, 0, 0]),
                    EPERM,
                    "{n} {domain} {ty} {proto}"
                );
            }
        }
    }

    #[test]
    fn foreign_abis_are_killed() {
        assert_eq!(
            run(
                &Filter::agent(false),
                0x4000_0003,
                libc::SYS_read as u32,
                [0; 6]
            ),
            RET_KILL_PROCESS,
            "i386"
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            run(
                &Filter::agent(false),
                AUDIT_ARCH,
                X32_SYSCALL_BIT | 1,
                [0; 6]
            ),
            RET_KILL_PROCESS,
            "x32 write"
        );
    }

    #[test]
    fn with_plain_arguments_only_the_listed_calls_are_refused() {
        let f = Filter::agent(false);
        let denied: Vec<u32> = denied().into_iter().map(|n| n as u32).collect();
        let missing = [libc::SYS_clone3 as u32, libc::SYS_openat2 as u32];
        for n in 0..1024u32 {
            let want = if denied.contains(&n) {
                EPERM
            } else if missing.contains(&n) {
                RET_ERRNO | libc::ENOSYS as u32
            } else {
                RET_ALLOW
            };
            assert_eq!(run(&f, AUDIT_ARCH, n, [0; 6]), want, "call {n}");
        }
    }

    #[test]
    fn memfd_can_be_refused_whole() {
        let f = Filter::agent(true);
        assert_eq!(
            run(&f, AUDIT_ARCH, libc::SYS_memfd_create as u32, [0; 6]),
            EPERM
        );
    }

    #[test]
    fn fits_the_kernel_limit() {
        for deny_memfd in [false, true] {
            let f = Filter::compile(deny_memfd).unwrap();
            assert!(!f.is_empty() && f.len() < 4096);
        }
    }
}
