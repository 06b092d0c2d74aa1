//! Webhook benchmark: signed webhooks over HTTP keep-alive connections → smsgw → a UA registered
//! on loopback that answers 200 — the benchmark plays both Twilio and the phone, so one clock
//! times webhook → SIP delivery. The UA registers `--extensions` extensions (each with its own
//! DID) from one socket, like a PBX's worth of phones behind one address; webhooks go to the DIDs
//! in turn. (smsgw delivers to one extension one MESSAGE at a time, RFC 3428 §8, so a single
//! extension's rate is bounded by its round trip.)
//!
//!   cargo build --release -p smsgw
//!   target/release/smsgw-bench-webhook --rate 5000 --secs 10 --extensions 50
//!
//! Reports webhooks/s answered 200, messages delivered (each exactly once?), latency percentiles
//! of the HTTP answer and of webhook → MESSAGE at the phone, and the gateway's RSS and CPU.

use md5::{Digest, Md5};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{between, cpu_secs, field, rss_kib, spawn_until};

mod support;

const ACCOUNT: &str = "AC00000000000000000000000000000000";
const TOKEN: &str = "bench-auth-token";

/// Extension `i`'s number and DID.
fn extension(i: u32) -> (String, String) {
    (format!("{}", 1000 + i), format!("+1501712{:04}", 1000 + i))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn md5(s: &str) -> String {
    hex(&Md5::digest(s.as_bytes()))
}

/// REGISTERs extension `ext` (MD5 digest) from `sock`; returns when the 200 arrived.
async fn register(sock: &tokio::net::UdpSocket, gw: SocketAddr, ext: &str) {
    let port = sock.local_addr().expect("addr").port();
    let req = |cseq: u32, auth: &str| {
        format!(
            "REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKr{ext}x{cseq};rport\r\n\
             From: <sip:{ext}@127.0.0.1>;tag=r\r\nTo: <sip:{ext}@127.0.0.1>\r\nCall-ID: reg{ext}@bench\r\nCSeq: {cseq} REGISTER\r\n\
             Contact: <sip:{ext}@127.0.0.1:{port}>\r\nExpires: 3600\r\n{auth}Content-Length: 0\r\n\r\n"
        )
    };
    let mut buf = vec![0u8; 4096];
    sock.send_to(req(1, "").as_bytes(), gw).await.expect("send");
    let n = sock.recv(&mut buf).await.expect("recv");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let nonce = between(&text, "nonce=\"", '"').expect("a challenge");
    let ha1 = md5(&format!("{ext}:127.0.0.1:pw{ext}"));
    let ha2 = md5("REGISTER:sip:127.0.0.1");
    let response = md5(&format!("{ha1}:{nonce}:00000001:abc:auth:{ha2}"));
    let auth = format!(
        "Authorization: Digest username=\"{ext}\", realm=\"127.0.0.1\", nonce=\"{nonce}\", uri=\"sip:127.0.0.1\", response=\"{response}\", algorithm=MD5, cnonce=\"abc\", qop=auth, nc=00000001\r\n"
    );
    sock.send_to(req(2, &auth).as_bytes(), gw)
        .await
        .expect("send");
    let n = sock.recv(&mut buf).await.expect("recv");
    assert!(
        buf[..n].starts_with(b"SIP/2.0 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// A 200 for a MESSAGE: Via, From, To (with a tag), Call-ID and CSeq copied.
fn ok_for(request: &str) -> String {
    let mut out = String::from("SIP/2.0 200 OK\r\n");
    for line in request.lines() {
        let name = line.split(':').next().unwrap_or_default();
        if ["Via", "From", "Call-ID", "CSeq"].contains(&name) {
            out.push_str(line.trim_end());
            out.push_str("\r\n");
        } else if name == "To" {
            out.push_str(line.trim_end());
            out.push_str(";tag=ua\r\n");
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

/// Keep-alive connections the generator posts on.
const CONNECTIONS: usize = 64;

/// Writes one request and reads its response (status line, headers, Content-Length body);
/// returns the status, or 0 if the connection failed.
async fn exchange(conn: &mut tokio::net::TcpStream, request: &[u8], buf: &mut Vec<u8>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if conn.write_all(request).await.is_err() {
        return 0;
    }
    buf.clear();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = between(&head, "content-length: ", '\r')
                .or_else(|| head.split("content-length: ").nth(1))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let mut chunk = [0u8; 4096];
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return 0,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return 0,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[derive(Default)]
struct Stats {
    http_ok: u64,
    http_other: HashMap<u16, u64>,
    http_latency: Vec<u32>,
    delivered: u64,
    duplicates: u64,
    delivery_latency: Vec<u32>,
}

fn main() {
    let mut rate = 5000u32;
    let mut secs = 10u32;
    let mut extensions = 50u32;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--rate" => rate = it.next().expect("value").parse().expect("number"),
            "--secs" => secs = it.next().expect("value").parse().expect("number"),
            "--extensions" => extensions = it.next().expect("value").parse().expect("number"),
            other => panic!("unknown flag {other}"),
        }
    }
    let dir = std::env::temp_dir().join(format!("smsgw-bench-wh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let webhook_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let exts: Vec<(String, String)> = (0..extensions.max(1)).map(extension).collect();
    let mut config = format!(
        r#"[gateway]
domain = "127.0.0.1"
public_url = "http://127.0.0.1:{webhook_port}"
data_dir = "{data}"

[sip]
listen = ["udp:127.0.0.1:0"]

[http]
webhook_listen = "127.0.0.1:{webhook_port}"
admin_listen = "127.0.0.1:0"
admin_token = "bench"

[[sms]]
name = "main"
account_sid = "{ACCOUNT}"
auth_token = "{TOKEN}"
dids = [{dids}]
api_base = "http://127.0.0.1:9"
"#,
        data = dir.join("data").display(),
        dids = exts
            .iter()
            .map(|(_, did)| format!("\"{did}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (ext, did) in &exts {
        config.push_str(&format!(
            "\n[[extensions]]\nid = \"{ext}\"\npassword = \"pw{ext}\"\ndids = [\"{did}\"]\n"
        ));
    }
    let path = dir.join("bench.toml");
    std::fs::write(&path, config).expect("config");
    let mut cmd = Command::new(support::smsgw_path());
    cmd.args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn,smsgw::app=info");
    let (mut gw, line) = spawn_until(cmd, "smsgw ready");
    let sip: SocketAddr = field(&line, "sip_udp").expect("sip").parse().expect("addr");
    let pid = gw.id();
    let webhook_url = {
        let out = Command::new(support::smsgw_path())
            .args(["webhook-url", "--config"])
            .arg(&path)
            .output()
            .expect("webhook-url");
        String::from_utf8_lossy(&out.stdout)
            .split('\t')
            .nth(1)
            .expect("url")
            .trim()
            .to_string()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stats: Arc<Mutex<Stats>> = Arc::default();
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let total = u64::from(rate) * u64::from(secs);
    let (gw_cpu0, own_cpu0) = (cpu_secs(&pid.to_string()), cpu_secs("self"));
    let started = Instant::now();
    rt.block_on(async {
        let ua = Arc::new(support::udp_socket());
        for (ext, _) in &exts {
            register(&ua, sip, ext).await;
        }
        // The phone: answers 200 and notes when each text arrived.
        {
            let (ua, stats, sent_at) = (ua.clone(), stats.clone(), sent_at.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = HashMap::new();
                loop {
                    let Ok((n, from)) = ua.recv_from(&mut buf).await else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if !text.starts_with("MESSAGE ") {
                        continue;
                    }
                    let _ = ua.send_to(ok_for(&text).as_bytes(), from).await;
                    let Some(seq) = text
                        .rsplit("seq ")
                        .next()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                    else {
                        continue;
                    };
                    // A retransmission (same Call-ID) is the same delivery; the same text in
                    // another transaction is a duplicate.
                    let call_id = between(&text, "Call-ID: ", '\r').unwrap_or_default().to_string();
                    let mut st = stats.lock().expect("lock");
                    match seen.get(&seq) {
                        Some(first) if *first == call_id => continue,
                        Some(_) => {
                            st.duplicates += 1;
                            continue;
                        }
                        None => {
                            seen.insert(seq, call_id);
                        }
                    }
                    st.delivered += 1;
                    if let Some(t) = sent_at.lock().expect("lock").get(&seq) {
                        st.delivery_latency.push(t.elapsed().as_micros() as u32);
                    }
                }
            });
        }
        // Twilio signs on its own machines: every webhook is signed and encoded before the
        // clock starts, so the generator's share of these two cores is sending, not hashing.
        let target = url::Url::parse(&webhook_url).expect("webhook URL");
        let path = target.path().to_string();
        let host = format!(
            "{}:{}",
            target.host_str().expect("host"),
            target.port().expect("port")
        );
        let requests: Vec<Vec<u8>> = (0..total)
            .map(|i| {
                let sid = format!("SM{i:032x}");
                let params: Vec<(String, String)> = vec![
                    ("AccountSid".into(), ACCOUNT.into()),
                    ("ApiVersion".into(), "2010-04-01".into()),
                    ("Body".into(), format!("hello seq {i}")),
                    ("From".into(), "+15551234567".into()),
                    ("MessageSid".into(), sid.clone()),
                    ("NumMedia".into(), "0".into()),
                    ("SmsMessageSid".into(), sid.clone()),
                    ("SmsSid".into(), sid),
                    ("SmsStatus".into(), "received".into()),
                    ("To".into(), exts[(i % exts.len() as u64) as usize].1.clone()),
                ];
                let sig = smsgw::twilio::signature::compute(TOKEN, &webhook_url, &params);
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(&params)
                    .finish();
                format!(
                    "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
                     X-Twilio-Signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            })
            .collect();
        // Keep-alive connections, one request in flight on each, like Twilio's webhook client;
        // a due webhook waits for a free connection, and its latency counts from when it was due
        // (no coordinated omission).
        let (due_tx, due_rx) = tokio::sync::mpsc::channel::<(Vec<u8>, Instant)>(total as usize);
        // Every connection takes the next due webhook (tokio's mpsc has one consumer).
        let due_rx = Arc::new(tokio::sync::Mutex::new(due_rx));
        for _ in 0..CONNECTIONS {
            let (due_rx, stats) = (due_rx.clone(), stats.clone());
            let addr: SocketAddr = host.parse().expect("addr");
            tokio::spawn(async move {
                let Ok(mut conn) = tokio::net::TcpStream::connect(addr).await else {
                    return;
                };
                let _ = conn.set_nodelay(true);
                let mut buf = Vec::with_capacity(4096);
                loop {
                    let next = due_rx.lock().await.recv().await;
                    let Some((request, due)) = next else {
                        break;
                    };
                    let code = exchange(&mut conn, &request, &mut buf).await;
                    let mut st = stats.lock().expect("lock");
                    st.http_latency.push(due.elapsed().as_micros() as u32);
                    if code == 200 {
                        st.http_ok += 1;
                    } else {
                        *st.http_other.entry(code).or_default() += 1;
                    }
                }
            });
        }
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        let begin = Instant::now();
        for (i, request) in requests.into_iter().enumerate() {
            let due = begin + interval.mul_f64(i as f64);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            sent_at.lock().expect("lock").insert(i as u64, due);
            let _ = due_tx.send((request, due)).await;
        }
        drop(due_tx);
        let answered = Instant::now() + Duration::from_secs(20);
        while {
            let st = stats.lock().expect("lock");
            st.http_ok + st.http_other.values().sum::<u64>() < total
        } && Instant::now() < answered
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while stats.lock().expect("lock").delivered < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let elapsed = started.elapsed();
    let (gw_cpu, own_cpu) = (
        cpu_secs(&pid.to_string()) - gw_cpu0,
        cpu_secs("self") - own_cpu0,
    );
    let rss = rss_kib(pid);
    let mut st = std::mem::take(&mut *stats.lock().expect("lock"));
    st.http_latency.sort_unstable();
    st.delivery_latency.sort_unstable();
    println!(
        "{total} webhooks offered at {rate}/s to {} extensions ({:.1} s in all)",
        exts.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "HTTP 200: {} ({:.3} %), other: {:?}; delivered to the phone: {} ({} duplicates)",
        st.http_ok,
        100.0 * st.http_ok as f64 / total as f64,
        st.http_other,
        st.delivered,
        st.duplicates
    );
    println!(
        "HTTP answer ms: p50 {:.2} p99 {:.2}; webhook -> MESSAGE at the phone ms: p50 {:.2} p99 {:.2} max {:.2}",
        support::percentile_ms(&st.http_latency, 0.5),
        support::percentile_ms(&st.http_latency, 0.99),
        support::percentile_ms(&st.delivery_latency, 0.5),
        support::percentile_ms(&st.delivery_latency, 0.99),
        support::percentile_ms(&st.delivery_latency, 1.0)
    );
    println!("CPU seconds: gateway {gw_cpu:.2}, load generator and phone {own_cpu:.2}; gateway RSS {rss} KiB");
    support::stop(&mut gw);
    let _ = std::fs::remove_dir_all(&dir);
}
