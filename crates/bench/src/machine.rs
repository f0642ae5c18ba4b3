//! The machine the figures come from: absolute times only mean something
//! next to it.

use std::process::{Command, Stdio};

use crate::node::Tools;
use crate::report::Table;

pub(crate) fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The `model name` of the first CPU in /proc/cpuinfo.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// MemTotal from /proc/meminfo, in GiB.
pub fn mem_gib(meminfo: &str) -> Option<f64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .map(|kib| kib / (1024.0 * 1024.0))
}

fn dpkg_version(pkg: &str) -> String {
    first_line("dpkg-query", &["-W", "-f", "${Version}", pkg])
}

pub fn describe(tools: &Tools) -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut t = Table::new(["", ""]);
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "unknown".into());
    t.row(["nproc".to_string(), nproc]);
    t.row([
        "CPU".to_string(),
        cpu_model(&read("/proc/cpuinfo")).unwrap_or_else(|| "unknown".into()),
    ]);
    t.row([
        "memory".to_string(),
        mem_gib(&read("/proc/meminfo")).map_or("unknown".into(), |g| format!("{g:.1} GiB")),
    ]);
    t.row([
        "kernel".to_string(),
        read("/proc/sys/kernel/osrelease").trim().to_string(),
    ]);
    t.row([
        "OS".to_string(),
        read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "unknown".into()),
    ]);
    t.row([
        "Open vSwitch".to_string(),
        first_line("ovs-vswitchd", &["--version"]),
    ]);
    t.row([
        "reference bridge + host-local".to_string(),
        format!(
            "containernetworking-plugins {} ({})",
            dpkg_version("containernetworking-plugins"),
            tools.cni_dir.display()
        ),
    ]);
    t.row(["etcd".to_string(), first_line("etcd", &["--version"])]);
    t.row(["iperf3".to_string(), first_line("iperf3", &["--version"])]);
    t.row([
        "boringtun (overlay section)".to_string(),
        match crate::overlay::find_boringtun() {
            Some(p) => format!(
                "{} ({}); wireguard-tools {}",
                first_line(&p.display().to_string(), &["--version"]),
                p.display(),
                dpkg_version("wireguard-tools")
            ),
            None => "not installed".into(),
        },
    ]);
    t.row(["evio commit".to_string(), {
        let rev = first_line("git", &["rev-parse", "--short", "HEAD"]);
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        if dirty {
            format!("{rev} (with uncommitted changes)")
        } else {
            rev
        }
    }]);
    t.row([
        "date (UTC)".to_string(),
        first_line("date", &["-u", "+%F %T"]),
    ]);
    // Other work on the machine skews absolute times (less so ratios).
    t.row([
        "load average at start (1/5/15 min)".to_string(),
        read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    ]);
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_memory_are_parsed() {
        let c = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: x\n";
        assert_eq!(cpu_model(c).as_deref(), Some("AMD EPYC 7B13"));
        let m = "MemTotal:       24683520 kB\nMemFree: 1 kB\n";
        let g = mem_gib(m).unwrap();
        assert!((g - 23.54).abs() < 0.01, "{g}");
    }
}
