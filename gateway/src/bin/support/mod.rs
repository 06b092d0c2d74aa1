//! What the benchmark programs share: starting processes, reading their addresses, and
//! measuring them from outside (RSS, CPU) the way `ps` would.
#![allow(dead_code)] // each benchmark uses its own part

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// Starts `cmd` and waits for a stderr line containing `ready`; returns the line. Later output
/// is drained so the child never blocks on a full pipe.
pub fn spawn_until(mut cmd: Command, ready: &str) -> (Child, String) {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let line = loop {
        let line = lines
            .next()
            .expect("the process exited before it was ready")
            .expect("read");
        if line.contains(ready) {
            break line;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, line)
}

/// `name=value` from a log line.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split(&format!("{name}="))
        .nth(1)?
        .split([' ', ','])
        .next()
}

pub fn smsgw_path() -> std::path::PathBuf {
    std::env::current_exe()
        .expect("own path")
        .with_file_name("smsgw")
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of a process so far ("self" for this one).
pub fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A process and its children (Kamailio works in forked processes), by pid.
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: state, then the parent's pid.
        let parent = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// CPU seconds of a process and its children.
pub fn tree_cpu_secs(pid: u32) -> f64 {
    with_children(pid)
        .iter()
        .map(|p| cpu_secs(&p.to_string()))
        .sum()
}

/// Proportional set size of a process and its children: shared memory counted once in all.
pub fn tree_pss_kib(pid: u32) -> u64 {
    with_children(pid)
        .iter()
        .filter_map(|p| {
            let rollup = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok()?;
            rollup
                .lines()
                .find(|l| l.starts_with("Pss:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The `p` quantile of sorted microseconds, in milliseconds.
pub fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// "p50 … p99 … max …" of sorted microseconds, in milliseconds.
pub fn p50_p99_max(sorted: &[u32]) -> String {
    format!(
        "p50 {:.2}  p99 {:.2}  max {:.2}",
        percentile_ms(sorted, 0.5),
        percentile_ms(sorted, 0.99),
        percentile_ms(sorted, 1.0)
    )
}

pub fn between<'a>(text: &'a str, start: &str, end: char) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
}

/// A UDP socket with a large receive buffer, so the generator itself does not drop answers.
pub fn udp_socket() -> tokio::net::UdpSocket {
    let raw =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    let _ = raw.set_recv_buffer_size(4 << 20);
    raw.set_nonblocking(true).expect("nonblocking");
    raw.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .expect("addr")
            .into(),
    )
    .expect("bind");
    tokio::net::UdpSocket::from_std(raw.into()).expect("socket")
}

pub fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
