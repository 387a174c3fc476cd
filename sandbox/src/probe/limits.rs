//! The limit attempts of the escape battery: each runs alone in a sandbox of its own with small
//! limits (`umbra verify` judges what the launcher saw: the exit code, the cgroup's counters).

use super::{last_err, os_err, ProbeConfig};

/// Runs the limit attempt `mode`; returns the process's exit code.
pub fn main(mode: &str, _cfg: &ProbeConfig) -> i32 {
    match mode {
        "fork" => fork_bomb(),
        "memory" => balloon(),
        "busy" => loop {
            std::hint::spin_loop();
        },
        other => {
            eprintln!("unknown probe mode {other:?}");
            2
        }
    }
}

/// Forks until the kernel refuses; prints how many children it got.
fn fork_bomb() -> i32 {
    let mut n = 0u64;
    let mut refused = String::new();
    for _ in 0..100_000 {
        // SAFETY: the child only sleeps and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: plain calls in the child.
            unsafe {
                libc::sleep(30);
                libc::_exit(0);
            }
        }
        if pid < 0 {
            refused = os_err(&last_err());
            break;
        }
        n += 1;
    }
    println!("{}", serde_json::json!({ "forked": n, "refused": refused }));
    0
}

/// Allocates and touches memory until the kernel stops it.
fn balloon() -> i32 {
    let mut keep: Vec<Vec<u8>> = Vec::new();
    for i in 0..1_000_000u64 {
        let mut v = vec![0u8; 1 << 20];
        for j in (0..v.len()).step_by(4096) {
            v[j] = (i as u8).wrapping_add(1);
        }
        keep.push(v);
    }
    println!("{}", serde_json::json!({ "allocated_mib": keep.len() }));
    0
}
