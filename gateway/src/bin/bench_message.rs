//! MESSAGE benchmark: SIP MESSAGE over UDP from a load generator (a trunk peer) → smsgw → the
//! Twilio stand-in answering after 50 ms, all on loopback, outbox durable (SQLite, FULL sync).
//!
//!   cargo build --release -p smsgw
//!   target/release/smsgw-bench-message --mode on_store --rate 14000 --secs 10
//!   target/release/smsgw-bench-message --mode after_twilio --rate 6000 --secs 10
//!
//! Reports the share of MESSAGEs answered 2xx, how many needed a retransmission (no answer within
//! 500 ms, as Timer E would resend), whether the stand-in got exactly one request per 2xx, final
//! response latency percentiles, and the gateway's RSS and CPU.
//!
//! `--against kamailio` puts the reference in smsgw's place, under the same load and stand-in:
//! Kamailio answering MESSAGE and POSTing it with http_async_client (`support/kamailio-message.cfg`;
//! nothing kept on disk). Debian does not ship that module; build it from Kamailio's source and
//! name the file with `--kamailio-module PATH` (BENCHMARKS.md has the commands). Kamailio runs
//! with the TLSF allocator, as production setups do (its default cost it a fifth of its CPU in
//! `qm_malloc`). Only `on_store` is a usable reference: in `after_twilio` mode (suspended
//! transactions) Kamailio 5.6.3 crashed after about 4,900 queries here. Runs alternating between
//! the two, in one stretch of time, give ratios that the shared machine's noise affects alike.
//!
//! Latency is reported twice: as the generator's task saw it, and stamped by the kernel when the
//! answer reached the generator's socket (`SO_TIMESTAMPNS`, on Linux). The second leaves out the time the
//! generator itself waited for a core to read the answer, which on a shared two-core machine is
//! part of the first.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use support::{between, cpu_secs, field, rss_kib, spawn_until, tree_cpu_secs, tree_pss_kib};

mod support;

struct Args {
    mode: String,
    rate: u32,
    secs: u32,
    latency_ms: u64,
    sockets: usize,
    against: Against,
    /// http_async_client.so, when Kamailio's module directory lacks it.
    kamailio_module: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Against {
    Smsgw,
    Kamailio,
}

impl Against {
    const ALL: [Self; 2] = [Self::Smsgw, Self::Kamailio];

    fn name(self) -> &'static str {
        match self {
            Self::Smsgw => "smsgw",
            Self::Kamailio => "kamailio",
        }
    }
}

fn parse_args() -> Args {
    let mut a = Args {
        mode: "on_store".into(),
        rate: 5000,
        secs: 10,
        latency_ms: 50,
        sockets: 16,
        against: Against::Smsgw,
        kamailio_module: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => a.mode = value(),
            "--rate" => a.rate = value().parse().expect("number"),
            "--secs" => a.secs = value().parse().expect("number"),
            "--latency-ms" => a.latency_ms = value().parse().expect("number"),
            "--sockets" => a.sockets = value().parse().expect("number"),
            "--against" => {
                let name = value();
                a.against = Against::ALL
                    .into_iter()
                    .find(|g| g.name() == name)
                    .unwrap_or_else(|| panic!("--against is smsgw or kamailio, not {name}"));
            }
            "--kamailio-module" => a.kamailio_module = Some(value()),
            other => panic!("unknown flag {other}; see the file's doc comment"),
        }
    }
    assert!(
        a.mode == "on_store" || a.mode == "after_twilio",
        "--mode is on_store or after_twilio"
    );
    a
}

const ACCOUNT: &str = "AC00000000000000000000000000000000";
const DID: &str = "+15017122661";

struct Pending {
    first_sent: Instant,
    /// The same moment on the clock the kernel stamps received datagrams with.
    sent_at: SystemTime,
    last_sent: Instant,
    retransmitted: bool,
    datagram: Vec<u8>,
    socket: usize,
}

/// Final response latencies in microseconds.
#[derive(Default)]
struct Latencies {
    all: Vec<u32>,
    /// Those of MESSAGEs sent after the first second (the HTTP pool to the stand-in has grown).
    steady: Vec<u32>,
}

impl Latencies {
    fn push(&mut self, micros: u32, steady: bool) {
        self.all.push(micros);
        if steady {
            self.steady.push(micros);
        }
    }

    fn print(mut self, what: &str) {
        self.all.sort_unstable();
        self.steady.sort_unstable();
        println!("{what}: {}", support::p50_p99_max(&self.all));
        println!(
            "  after the first second: {}",
            support::p50_p99_max(&self.steady)
        );
    }
}

#[derive(Default)]
struct Stats {
    /// When the generator's task read the answer.
    seen: Latencies,
    /// When the kernel put the answer in the generator's socket.
    stamped: Latencies,
    ok: u64,
    failed: HashMap<u16, u64>,
    retransmitted: u64,
}

fn message(i: u64, port: u16, gw: SocketAddr) -> Vec<u8> {
    let to = format!("+1555{:07}", i % 10_000_000);
    let body = format!("load {i}");
    let mut m = String::with_capacity(512);
    let _ = write!(
        m,
        "MESSAGE sip:{to}@{gw} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKm{i};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:pbx@127.0.0.1>;tag=b{i}\r\nTo: <sip:{to}@{gw}>\r\nCall-ID: {i}@bench\r\n\
         CSeq: 1 MESSAGE\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    m.into_bytes()
}

/// Has the kernel stamp every datagram `socket` receives with its arrival time.
#[cfg(target_os = "linux")]
fn stamp_arrivals(socket: &tokio::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&raw const on).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
}

/// Reads one datagram without waiting, with the arrival time the kernel stamped on it.
#[cfg(target_os = "linux")]
fn recv_stamped(
    socket: &tokio::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SystemTime)> {
    use std::os::fd::AsRawFd;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is its empty value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &raw mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: hdr points at iov and control, which outlive the call and are the sizes stated.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut hdr, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: walks the control messages recvmsg just wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                let at =
                    SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                return Ok((n as usize, at));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const hdr, cmsg);
        }
    }
    Err(std::io::Error::other(
        "no SO_TIMESTAMPNS stamp on a datagram",
    ))
}

/// Elsewhere, the stamp is taken on reading.
#[cfg(not(target_os = "linux"))]
fn stamp_arrivals(_: &tokio::net::UdpSocket) {}

#[cfg(not(target_os = "linux"))]
fn recv_stamped(
    socket: &tokio::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SystemTime)> {
    Ok((socket.try_recv(buf)?, SystemTime::now()))
}

async fn run(args: &Args, gw: SocketAddr) -> (Stats, Duration, u64) {
    let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
    let stats: Arc<Mutex<Stats>> = Arc::default();
    let sockets: Vec<Arc<tokio::net::UdpSocket>> = (0..args.sockets)
        .map(|_| {
            let s = support::udp_socket();
            stamp_arrivals(&s);
            Arc::new(s)
        })
        .collect();
    let rate = args.rate;
    for s in &sockets {
        let (s, pending, stats) = (s.clone(), pending.clone(), stats.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, arrived)) = s
                    .async_io(tokio::io::Interest::READABLE, || recv_stamped(&s, &mut buf))
                    .await
                else {
                    continue;
                };
                let text = String::from_utf8_lossy(&buf[..n]);
                let code: u16 = text.get(8..11).and_then(|c| c.parse().ok()).unwrap_or(0);
                if code < 200 {
                    continue;
                }
                let Some(i) = between(&text, "Call-ID: ", '@').and_then(|c| c.parse::<u64>().ok())
                else {
                    continue;
                };
                let Some(p) = pending.lock().expect("lock").remove(&i) else {
                    continue;
                };
                let mut st = stats.lock().expect("lock");
                let steady = i >= u64::from(rate);
                st.seen
                    .push(p.first_sent.elapsed().as_micros() as u32, steady);
                let stamped = arrived.duration_since(p.sent_at).unwrap_or_default();
                st.stamped.push(stamped.as_micros() as u32, steady);
                if p.retransmitted {
                    st.retransmitted += 1;
                }
                if (200..300).contains(&code) {
                    st.ok += 1;
                } else {
                    *st.failed.entry(code).or_default() += 1;
                }
            }
        });
    }
    // Timer E: resend what has had no answer for 500 ms (then 1 s, 2 s, …).
    {
        let (pending, sockets) = (pending.clone(), sockets.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = Instant::now();
                let mut resend = Vec::new();
                for p in pending.lock().expect("lock").values_mut() {
                    let waited = now.duration_since(p.last_sent);
                    let interval = now
                        .duration_since(p.first_sent)
                        .max(Duration::from_millis(500));
                    if waited >= Duration::from_millis(500).max(interval / 2) {
                        p.last_sent = now;
                        p.retransmitted = true;
                        resend.push((p.socket, p.datagram.clone()));
                    }
                }
                for (s, d) in resend {
                    let _ = sockets[s].send_to(&d, gw).await;
                }
            }
        });
    }
    let total = u64::from(args.rate) * u64::from(args.secs);
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let started = Instant::now();
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let si = (i as usize) % sockets.len();
        let port = sockets[si].local_addr().expect("addr").port();
        let datagram = message(i, port, gw);
        let now = Instant::now();
        pending.lock().expect("lock").insert(
            i,
            Pending {
                first_sent: now,
                sent_at: SystemTime::now(),
                last_sent: now,
                retransmitted: false,
                datagram: datagram.clone(),
                socket: si,
            },
        );
        let _ = sockets[si].send_to(&datagram, gw).await;
    }
    let send_time = started.elapsed();
    // Stragglers get up to Timer F's 32 s like a real UAC.
    let deadline = Instant::now() + Duration::from_secs(32);
    while !pending.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lost = pending.lock().expect("lock").len() as u64;
    let st = std::mem::take(&mut *stats.lock().expect("lock"));
    (st, send_time, lost)
}

fn http_json(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// smsgw with the load generator as a trunk peer, sending from one DID.
fn start_smsgw(args: &Args, dir: &std::path::Path, sim_addr: SocketAddr) -> (Child, SocketAddr) {
    let config = format!(
        r#"[gateway]
domain = "127.0.0.1"
public_url = "http://127.0.0.1:1"
data_dir = "{data}"

[sip]
listen = ["udp:127.0.0.1:0"]

[http]
webhook_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token = "bench"

[messaging]
max_in_flight = 100000

[[trunks]]
name = "load"
allow = ["127.0.0.1/32"]
uri = "sip:127.0.0.1:9"
answer = "{mode}"

[[sms]]
name = "main"
account_sid = "{ACCOUNT}"
auth_token = "bench"
dids = ["{DID}"]
api_base = "http://{sim_addr}"
messages_per_second = 1000000

[[outbound_rules]]
name = "load"
from = ["trunk:load"]
to = "^\\+?1?(\\d{{10}})$"
rewrite = "+1$1"
sms = "main"
sender = "did:{DID}"
"#,
        data = dir.join("data").display(),
        mode = args.mode
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, config).expect("config");
    let mut gw_cmd = Command::new(support::smsgw_path());
    gw_cmd
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn,smsgw::app=info");
    let (gw, line) = spawn_until(gw_cmd, "smsgw ready");
    let addr: SocketAddr = field(&line, "sip_udp")
        .expect("sip_udp")
        .parse()
        .expect("addr");
    (gw, addr)
}

/// Kamailio with `support/kamailio-message.cfg`, ready once it answers an OPTIONS.
fn start_kamailio(args: &Args, dir: &std::path::Path, sim_addr: SocketAddr) -> (Child, SocketAddr) {
    let path = dir.join("kamailio.cfg");
    std::fs::write(&path, include_str!("support/kamailio-message.cfg")).expect("config");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let mut cmd = Command::new("kamailio");
    cmd.arg("-f")
        .arg(&path)
        .args(["-DD", "-E", "-x", "tlsf", "-Y"])
        .arg(dir)
        .arg("-A")
        .arg(format!("SIP_PORT={port}"))
        .arg("-A")
        .arg(format!(
            "SIM_URL=\"http://{sim_addr}/2010-04-01/Accounts/{ACCOUNT}/Messages.json\""
        ))
        .arg("-A")
        .arg(format!("ACCOUNT=\"{ACCOUNT}\""))
        .arg("-A")
        .arg("TOKEN=\"bench\"")
        .arg("-A")
        .arg(format!("FROM=\"{DID}\""));
    if args.mode == "on_store" {
        cmd.arg("-A").arg("ANSWER_ON_STORE");
    }
    if let Some(module) = &args.kamailio_module {
        cmd.arg("-A").arg(format!("HTTP_ASYNC_CLIENT=\"{module}\""));
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start kamailio (is it installed?): {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let options = format!(
        "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKready;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:bench@127.0.0.1>;tag=r\r\nTo: <sip:{addr}>\r\n\
         Call-ID: ready@bench\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        probe.local_addr().expect("addr")
    );
    let mut buf = [0u8; 2048];
    for _ in 0..100 {
        let _ = probe.send_to(options.as_bytes(), addr);
        if probe.recv(&mut buf).is_ok() {
            return (child, addr);
        }
    }
    support::stop(&mut child);
    panic!("kamailio did not answer on {addr} within 10 s");
}

fn main() {
    let args = parse_args();
    let dir = std::env::temp_dir().join(format!("smsgw-bench-msg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut sim_cmd = Command::new(support::smsgw_path());
    sim_cmd
        .args([
            "twilio-sim",
            "--listen",
            "127.0.0.1:0",
            "--account-sid",
            ACCOUNT,
            "--auth-token",
            "bench",
            "--number",
            DID,
        ])
        .env("RUST_LOG", "warn,smsgw::cli=info");
    let (mut sim, line) = spawn_until(sim_cmd, "stand-in ready");
    let sim_addr: SocketAddr = field(&line, "listen")
        .expect("listen")
        .parse()
        .expect("addr");
    let mode = format!(
        "{{\"latency_ms\": {}, \"no_callbacks\": true}}",
        args.latency_ms
    );
    http_json(sim_addr, "POST", "/_sim/mode", &mode);

    let (mut gw, gw_addr) = match args.against {
        Against::Smsgw => start_smsgw(&args, &dir, sim_addr),
        Against::Kamailio => start_kamailio(&args, &dir, sim_addr),
    };
    let pid = gw.id();
    std::thread::sleep(Duration::from_secs(1));
    let (gw_cpu0, sim_cpu0, own_cpu0) = (
        tree_cpu_secs(pid),
        cpu_secs(&sim.id().to_string()),
        cpu_secs("self"),
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (st, send_time, lost) = runtime.block_on(run(&args, gw_addr));
    let (rss, pss) = (rss_kib(pid), tree_pss_kib(pid));
    let (gw_cpu, sim_cpu, own_cpu) = (
        tree_cpu_secs(pid) - gw_cpu0,
        cpu_secs(&sim.id().to_string()) - sim_cpu0,
        cpu_secs("self") - own_cpu0,
    );
    // Let the outbox finish what was answered 202 before Twilio took it.
    std::thread::sleep(Duration::from_secs(3));
    let sim_stats: serde_json::Value =
        serde_json::from_str(&http_json(sim_addr, "GET", "/_sim/stats", "")).unwrap_or_default();
    let total = u64::from(args.rate) * u64::from(args.secs);
    let pct = |n: u64| 100.0 * n as f64 / total as f64;
    println!(
        "{} in mode {}: {} MESSAGEs offered at {}/s over {:.1} s",
        args.against.name(),
        args.mode,
        total,
        args.rate,
        send_time.as_secs_f64()
    );
    println!(
        "2xx: {} ({:.3} %), other finals: {:?}, no final answer: {lost}, retransmitted: {} ({:.3} %)",
        st.ok,
        pct(st.ok),
        st.failed,
        st.retransmitted,
        pct(st.retransmitted)
    );
    println!(
        "stand-in: {} messages created, {} duplicate bodies (2xx answered: {})",
        sim_stats["messages"], sim_stats["duplicate_bodies"], st.ok
    );
    st.seen
        .print("final response latency ms, as the generator's task saw it");
    st.stamped
        .print("final response latency ms, stamped by the kernel on arrival");
    println!(
        "CPU seconds: gateway {gw_cpu:.2}, stand-in {sim_cpu:.2}, load generator {own_cpu:.2}; \
         gateway RSS {rss} KiB (main process), PSS {pss} KiB (with its children)"
    );
    support::stop(&mut gw);
    support::stop(&mut sim);
    let _ = std::fs::remove_dir_all(&dir);
}
