//! REGISTER benchmark: starts `smsgw` with N extensions, registers every one of them over UDP with
//! SHA-256 digest (401 challenge + authenticated retry, as a phone does), and reports completed
//! registrations per second, latency percentiles and the gateway's memory.
//!
//!   cargo build --release -p smsgw
//!   target/release/smsgw-bench-register --extensions 100000 --rate 0 --window 400
//!   target/release/smsgw-bench-register --extensions 100000 --rate 11000
//!
//! `--rate 0` is closed loop (at most `--window` registrations in flight) and finds the ceiling;
//! a positive rate is open loop at that many registrations per second, for latency. The memory
//! figure is taken `--settle` seconds (at least 33, past Timer J; 0 skips it) after the load and
//! compared with the idle gateway 10 s after start.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{between, cpu_secs, rss_kib};
use tokio::net::UdpSocket;

mod support;

const REALM: &str = "127.0.0.1";
const FIRST_EXT: u32 = 1_000_000;

struct Args {
    extensions: u32,
    rate: u32,
    window: usize,
    sockets: usize,
    smsgw: PathBuf,
    settle_secs: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        extensions: 100_000,
        rate: 0,
        window: 400,
        sockets: 32,
        smsgw: support::smsgw_path(),
        settle_secs: 35,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--extensions" => args.extensions = value().parse().expect("number"),
            "--rate" => args.rate = value().parse().expect("number"),
            "--window" => args.window = value().parse().expect("number"),
            "--sockets" => args.sockets = value().parse().expect("number"),
            "--smsgw" => args.smsgw = value().into(),
            "--settle" => args.settle_secs = value().parse().expect("number"),
            other => panic!("unknown flag {other}; see the file's doc comment"),
        }
    }
    args
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn sha256(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

fn start_gateway(args: &Args, dir: &std::path::Path) -> (Child, SocketAddr) {
    let mut config = format!(
        "[gateway]\ndomain = \"{REALM}\"\npublic_url = \"http://127.0.0.1:1\"\ndata_dir = \"{}\"\n\n\
         [sip]\nlisten = [\"udp:127.0.0.1:0\"]\n\n\
         [http]\nwebhook_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"bench\"\n",
        dir.join("data").display()
    );
    for i in 0..args.extensions {
        let _ = write!(
            config,
            "\n[[extensions]]\nid = \"{}\"\npassword = \"pw{i}\"\n",
            FIRST_EXT + i
        );
    }
    let path = dir.join("bench.toml");
    std::fs::write(&path, config).expect("write config");
    let mut child = Command::new(&args.smsgw)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn,smsgw::app=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", args.smsgw.display()));
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("smsgw exited").expect("read");
        if let Some(rest) = line.split("sip_udp=").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .expect("addr")
                .parse()
                .expect("addr");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

struct Pending {
    ext: u32,
    started: Instant,
    sent: Instant,
}

#[derive(Default)]
struct Stats {
    registrations: Vec<u32>,
    requests: Vec<u32>,
    failures: u64,
    codes: HashMap<u16, u64>,
    last_done: Option<Instant>,
}

fn register(ext: u32, call: u64, cseq: u32, port: u16, auth: Option<&str>) -> Vec<u8> {
    let mut m = String::with_capacity(640);
    let _ = write!(
        m,
        "REGISTER sip:{REALM} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call}x{cseq};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:{ext}@{REALM}>;tag={call}\r\nTo: <sip:{ext}@{REALM}>\r\n\
         Call-ID: {call}@bench\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:{ext}@127.0.0.1:{port}>\r\nExpires: 3600\r\n"
    );
    if let Some(a) = auth {
        let _ = write!(m, "Authorization: {a}\r\n");
    }
    m.push_str("Content-Length: 0\r\n\r\n");
    m.into_bytes()
}

fn authorization(ext: u32, nonce: &str) -> String {
    let ha1 = sha256(&format!("{ext}:{REALM}:pw{}", ext - FIRST_EXT));
    let uri = format!("sip:{REALM}");
    let ha2 = sha256(&format!("REGISTER:{uri}"));
    let cnonce = "0a4f113b";
    let response = sha256(&format!("{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}"));
    format!(
        "Digest username=\"{ext}\", realm=\"{REALM}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{response}\", \
         algorithm=SHA-256, cnonce=\"{cnonce}\", qop=auth, nc=00000001"
    )
}

async fn run_load(args: &Args, gw: SocketAddr) -> (Stats, Duration) {
    let total = args.extensions;
    let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
    let stats: Arc<Mutex<Stats>> = Arc::default();
    let done = Arc::new(tokio::sync::Semaphore::new(0));
    let window = Arc::new(tokio::sync::Semaphore::new(if args.rate == 0 {
        args.window
    } else {
        usize::MAX >> 4
    }));
    let mut sockets = Vec::new();
    for _ in 0..args.sockets {
        let s: Arc<UdpSocket> = Arc::new(support::udp_socket());
        sockets.push(s.clone());
        let (pending, stats, done, window) =
            (pending.clone(), stats.clone(), done.clone(), window.clone());
        tokio::spawn(async move {
            let port = s.local_addr().expect("addr").port();
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok(n) = s.recv(&mut buf).await else {
                    continue;
                };
                let text = String::from_utf8_lossy(&buf[..n]);
                let code: u16 = text.get(8..11).and_then(|c| c.parse().ok()).unwrap_or(0);
                let Some(call) =
                    between(&text, "Call-ID: ", '@').and_then(|c| c.parse::<u64>().ok())
                else {
                    continue;
                };
                let now = Instant::now();
                let entry = pending.lock().expect("lock").remove(&call);
                let Some(p) = entry else { continue };
                stats
                    .lock()
                    .expect("lock")
                    .requests
                    .push(now.duration_since(p.sent).as_micros() as u32);
                match code {
                    401 => {
                        let nonce = between(&text, "nonce=\"", '"').unwrap_or_default();
                        let msg =
                            register(p.ext, call, 2, port, Some(&authorization(p.ext, nonce)));
                        pending.lock().expect("lock").insert(
                            call,
                            Pending {
                                sent: Instant::now(),
                                ..p
                            },
                        );
                        let _ = s.send_to(&msg, gw).await;
                    }
                    200 => {
                        stats
                            .lock()
                            .expect("lock")
                            .registrations
                            .push(now.duration_since(p.started).as_micros() as u32);
                        stats.lock().expect("lock").last_done = Some(now);
                        window.add_permits(1);
                        done.add_permits(1);
                    }
                    other => {
                        let mut st = stats.lock().expect("lock");
                        st.failures += 1;
                        *st.codes.entry(other).or_default() += 1;
                        window.add_permits(1);
                        done.add_permits(1);
                    }
                }
            }
        });
    }
    let started = Instant::now();
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    for i in 0..total {
        if let Some(iv) = interval {
            let due = started + iv * i;
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        window.acquire().await.expect("open").forget();
        let sock = &sockets[i as usize % sockets.len()];
        let port = sock.local_addr().expect("addr").port();
        let ext = FIRST_EXT + i;
        let call = u64::from(i) + (u64::from(std::process::id()) << 32);
        let now = Instant::now();
        pending.lock().expect("lock").insert(
            call,
            Pending {
                ext,
                started: now,
                sent: now,
            },
        );
        let _ = sock.send_to(&register(ext, call, 1, port, None), gw).await;
    }
    // Whatever has not completed 5 s after the last send is a failure (lost or unanswered).
    let all = done.acquire_many(total);
    let finished = tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .is_ok();
    let mut st = std::mem::take(&mut *stats.lock().expect("lock"));
    let elapsed = st
        .last_done
        .unwrap_or_else(Instant::now)
        .duration_since(started);
    if !finished {
        st.failures += pending.lock().expect("lock").len() as u64;
    }
    (st, elapsed)
}

fn main() {
    let args = parse_args();
    let dir = std::env::temp_dir().join(format!("smsgw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (mut child, gw) = start_gateway(&args, &dir);
    let pid = child.id();
    // The idle baseline, once start-up garbage (parsing 100,000 extensions) has been returned.
    std::thread::sleep(Duration::from_secs(10));
    let baseline = rss_kib(pid);
    let (gw_cpu0, own_cpu0) = (cpu_secs(&pid.to_string()), cpu_secs("self"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut stats, elapsed) = runtime.block_on(run_load(&args, gw));
    let after_load = rss_kib(pid);
    let (gw_cpu, own_cpu) = (
        cpu_secs(&pid.to_string()) - gw_cpu0,
        cpu_secs("self") - own_cpu0,
    );
    stats.registrations.sort_unstable();
    stats.requests.sort_unstable();
    let completed = stats.registrations.len();
    println!(
        "mode: {}",
        if args.rate == 0 {
            format!("closed loop, window {}", args.window)
        } else {
            format!("open loop, {} registrations/s offered", args.rate)
        }
    );
    println!(
        "registrations: {completed} completed, {} failed {:?} in {:.2} s = {:.0} registrations/s ({:.0} REGISTER requests/s)",
        stats.failures,
        stats.codes,
        elapsed.as_secs_f64(),
        completed as f64 / elapsed.as_secs_f64(),
        stats.requests.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "registration latency (challenge + authenticated retry) ms: {}",
        support::p50_p99_max(&stats.registrations)
    );
    println!(
        "per-request latency ms: p50 {:.2}  p99 {:.2}",
        support::percentile_ms(&stats.requests, 0.5),
        support::percentile_ms(&stats.requests, 0.99)
    );
    println!(
        "CPU seconds during the load: gateway {gw_cpu:.2}, load generator {own_cpu:.2} (wall {:.2})",
        elapsed.as_secs_f64()
    );
    println!("gateway RSS KiB: {baseline} before load, {after_load} right after");
    if args.settle_secs >= 33 {
        // Timer J keeps each answered UDP transaction for 32 s; measure once they are gone.
        std::thread::sleep(Duration::from_secs(args.settle_secs));
        let settled = rss_kib(pid);
        println!(
            "gateway RSS KiB after {} s (transactions expired): {settled}; {:.0} bytes per registration above the idle baseline",
            args.settle_secs,
            (settled.saturating_sub(baseline) * 1024) as f64 / completed.max(1) as f64
        );
    }
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
