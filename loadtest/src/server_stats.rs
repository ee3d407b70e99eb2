//! What the server under test costs, read from /proc: resident memory (VmRSS) and CPU time
//! (utime + stime) summed over the given PIDs and all their descendants (nginx's workers,
//! Pushpin's condure/proxy/handler), plus the kernel's TCP socket memory, which is not in any
//! process's RSS but is a real cost of holding connections.

use std::collections::BTreeSet;
use std::fs;

use anyhow::{Context, Result};
use serde::Serialize;

/// Clock ticks per second for /proc CPU times.
pub fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// utime + stime of one process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).context("unexpected /proc/<pid>/stat format")
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3 in proc(5)); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn parent_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// VmRSS of one process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status =
        fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_status_kib(&status, "VmRSS:").context("no VmRSS line")
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key))?.split_whitespace().next()?.parse().ok()
}

/// The soft open-files limit of a process, to state in results.
pub fn open_files_limit(pid: u32) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// `pids` and every process descending from them.
pub fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let mut set: BTreeSet<u32> = pids.iter().copied().collect();
    let mut parents = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some(ppid) = parent_of(&stat)
            {
                parents.push((pid, ppid));
            }
        }
    }
    loop {
        let before = set.len();
        for &(pid, ppid) in &parents {
            if set.contains(&ppid) {
                set.insert(pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    set.into_iter().collect()
}

/// Kernel TCP buffer memory in KiB (`mem` pages in /proc/net/sockstat), for every socket on
/// the machine — clients included — so only its change is meaningful.
pub fn tcp_kernel_kib() -> Option<u64> {
    let s = fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = tcp.split_whitespace();
    while let Some(k) = it.next() {
        if k == "mem" {
            let pages: u64 = it.next()?.parse().ok()?;
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
            return Some(pages * page / 1024);
        }
    }
    None
}

/// One reading of the server's processes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub pids: Vec<u32>,
    pub rss_kib: u64,
    pub cpu_ticks: u64,
    pub tcp_kernel_kib: u64,
}

/// The server under test, as root PIDs given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Server {
    roots: Vec<u32>,
}

impl Server {
    pub fn new(roots: Vec<u32>) -> Self {
        Self { roots }
    }

    pub fn is_known(&self) -> bool {
        !self.roots.is_empty()
    }

    pub fn sample(&self) -> Sample {
        let pids = with_descendants(&self.roots);
        let mut s = Sample { tcp_kernel_kib: tcp_kernel_kib().unwrap_or(0), ..Sample::default() };
        for &p in &pids {
            // A process that exited between listing and reading simply adds nothing.
            s.rss_kib += rss_kib(p).unwrap_or(0);
            s.cpu_ticks += cpu_ticks(p).unwrap_or(0);
        }
        s.pids = pids;
        s
    }

    /// The lowest open-files limit among the server's processes.
    pub fn open_files_limit(&self) -> Option<u64> {
        with_descendants(&self.roots).into_iter().filter_map(open_files_limit).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 37 5 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(42));
        assert_eq!(parent_of(stat), Some(1));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        cpu_ticks(me).unwrap();
        assert!(open_files_limit(me).unwrap() > 0);
        assert!(with_descendants(&[me]).contains(&me));
        assert_eq!(parse_status_kib("VmRSS:\t  1234 kB\n", "VmRSS:"), Some(1234));
    }
}
