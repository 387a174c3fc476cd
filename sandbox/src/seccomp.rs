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

use std::io;

/// A compiled filter, ready to install.
#[derive(Debug, Clone)]
pub struct Filter {
    program: Vec<libc::sock_filter>,
}

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of argument `i` (both supported architectures are little-endian).
const fn off_arg(i: u32) -> u32 {
    16 + 8 * i
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

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

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn nr(n: libc::c_long) -> u32 {
    // System call numbers are small non-negative constants.
    n as u32
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

impl Filter {
    /// The agent filter for the architecture this binary was built for. `deny_memfd` refuses
    /// memfd_create entirely, for kernels that cannot make memory files non-executable.
    pub fn agent(deny_memfd: bool) -> Filter {
        let mut p = vec![
            stmt(LD_W_ABS, OFF_ARCH),
            jump(JEQ_K, AUDIT_ARCH, 1, 0),
            stmt(RET_K, RET_KILL_PROCESS),
            stmt(LD_W_ABS, OFF_NR),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            p.push(jump(JGE_K, X32_SYSCALL_BIT, 0, 1));
            p.push(stmt(RET_K, RET_KILL_PROCESS));
        }
        let eperm = stmt(RET_K, RET_ERRNO | libc::EPERM as u32);
        let mut denied = denied();
        if deny_memfd {
            denied.push(libc::SYS_memfd_create);
        }
        for n in denied {
            p.push(jump(JEQ_K, nr(n), 0, 1));
            p.push(eperm);
        }
        // clone3 passes its flags in memory the filter cannot read: report it missing so that
        // the C library falls back to clone, whose flags are checked below.
        p.push(jump(JEQ_K, nr(libc::SYS_clone3), 0, 1));
        p.push(stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32));

        // Each argument check below reloads the number afterwards, so blocks are independent.
        let reload = stmt(LD_W_ABS, OFF_NR);

        // clone(flags, ...): no new namespaces.
        p.push(jump(JEQ_K, nr(libc::SYS_clone), 0, 4));
        p.push(stmt(LD_W_ABS, off_arg(0)));
        p.push(jump(JSET_K, CLONE_NEW_MASK, 0, 1));
        p.push(eperm);
        p.push(reload);

        // memfd_create(name, flags): never executable.
        p.push(jump(JEQ_K, nr(libc::SYS_memfd_create), 0, 4));
        p.push(stmt(LD_W_ABS, off_arg(1)));
        p.push(jump(JSET_K, MFD_EXEC, 0, 1));
        p.push(eperm);
        p.push(reload);

        // openat2 passes its mode in memory the filter cannot read: report it missing so that
        // the C library falls back to openat, whose mode is checked below.
        p.push(jump(JEQ_K, nr(libc::SYS_openat2), 0, 1));
        p.push(stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32));

        // No set-user-ID or set-group-ID bit, by chmod or at creation: (call, mode argument).
        for (call, arg) in mode_args() {
            p.push(jump(JEQ_K, nr(call), 0, 4));
            p.push(stmt(LD_W_ABS, off_arg(arg)));
            p.push(jump(JSET_K, SET_ID_BITS, 0, 1));
            p.push(eperm);
            p.push(reload);
        }

        // ioctl(fd, request): no typing into the controlling terminal.
        p.push(jump(JEQ_K, nr(libc::SYS_ioctl), 0, 5));
        p.push(stmt(LD_W_ABS, off_arg(1)));
        p.push(jump(JEQ_K, TIOCSTI, 1, 0));
        p.push(jump(JEQ_K, TIOCLINUX, 0, 1));
        p.push(eperm);
        p.push(reload);

        // socket(domain, type, protocol) and socketpair alike.
        for call in [libc::SYS_socket, libc::SYS_socketpair] {
            // Offsets: 11 is the refusal, 12 the allowance, 13 the reload.
            p.push(jump(JEQ_K, nr(call), 0, 13)); // 0
            p.push(stmt(LD_W_ABS, off_arg(0))); // 1
            p.push(jump(JEQ_K, libc::AF_PACKET as u32, 8, 0)); // 2
            p.push(jump(JEQ_K, libc::AF_VSOCK as u32, 7, 0)); // 3
            p.push(jump(JEQ_K, libc::AF_NETLINK as u32, 0, 2)); // 4
            p.push(stmt(LD_W_ABS, off_arg(2))); // 5
                                                // Routing netlink only: enough to read one's own interfaces and addresses; the
                                                // kernel refuses changes to them, as the agent holds no capability.
            p.push(jump(JEQ_K, libc::NETLINK_ROUTE as u32, 5, 4)); // 6
            p.push(stmt(LD_W_ABS, off_arg(1))); // 7
            p.push(stmt(AND_K, SOCK_TYPE_MASK)); // 8
            p.push(jump(JEQ_K, libc::SOCK_RAW as u32, 1, 0)); // 9
            p.push(jump(JEQ_K, SOCK_PACKET, 0, 1)); // 10
            p.push(eperm); // 11
            p.push(stmt(RET_K, RET_ALLOW)); // 12
            p.push(reload); // 13
        }
        p.push(stmt(RET_K, RET_ALLOW));
        Filter { program: p }
    }

    /// How many instructions the program has (the kernel allows 4096).
    pub fn len(&self) -> usize {
        self.program.len()
    }

    /// Whether the program is empty (never, for a built filter).
    pub fn is_empty(&self) -> bool {
        self.program.is_empty()
    }

    /// Installs the filter on the calling thread and every child it starts. Requires
    /// `no_new_privs`, which the sandbox init sets first (`init.rs`, before Landlock and this
    /// filter).
    pub fn install(&self) -> io::Result<()> {
        let prog = libc::sock_fprog {
            len: u16::try_from(self.program.len())
                .map_err(|_| io::Error::other("seccomp program too long"))?,
            filter: self.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at a live, well-formed program for the duration of the call;
        // the kernel copies it.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const libc::sock_fprog as libc::c_ulong,
                0,
                0,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the subset of classic BPF the filter uses, so the program's
    /// decisions are tested without installing it.
    fn run(f: &Filter, arch: u32, nr: u32, args: [u32; 6]) -> u32 {
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = f.program[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    acc = match i.k {
                        0 => nr,
                        4 => arch,
                        k if k >= 16 && (k - 16) % 8 == 0 => args[((k - 16) / 8) as usize],
                        k => panic!("load from {k}"),
                    }
                }
                JEQ_K | JGE_K | JSET_K => {
                    let hit = match i.code {
                        JEQ_K => acc == i.k,
                        JGE_K => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                AND_K => acc &= i.k,
                RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
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
    fn memfd_can_be_refused_whole() {
        let f = Filter::agent(true);
        assert_eq!(
            run(&f, AUDIT_ARCH, libc::SYS_memfd_create as u32, [0; 6]),
            EPERM
        );
    }

    #[test]
    fn fits_the_kernel_limit() {
        let f = Filter::agent(false);
        assert!(!f.is_empty() && f.len() < 4096);
    }
}
