//! Harness for black-box tests: starts the built `smsgw` binary on loopback ports chosen by the
//! kernel, reads the addresses it reports, and drives real SIP peers against it.
#![allow(dead_code)] // each test file uses its own part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "smsgw-bb-{name}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ u128::from(rand_u32())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u32::from_le_bytes(b)
}

/// A config for tests: loopback, kernel-chosen ports, extensions 101 (pw101) and 102 (pw102).
pub fn config(data_dir: &Path, sip_extra: &str) -> String {
    format!(
        r#"
[gateway]
domain = "127.0.0.1"
public_url = "http://127.0.0.1:1"
data_dir = "{data}"
shutdown_grace_secs = 5

[sip]
listen = ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"]
{sip_extra}

[http]
webhook_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"

[[extensions]]
id = "101"
password = "pw101"
dids = ["+15017122661"]

[[extensions]]
id = "102"
password = "pw102"
"#,
        data = data_dir.display()
    )
}

pub struct Gateway {
    child: Child,
    pub dir: PathBuf,
    pub sip_udp: SocketAddr,
    pub sip_tcp: SocketAddr,
    pub admin: SocketAddr,
    pub webhook: SocketAddr,
    log: Arc<Mutex<String>>,
}

fn field(line: &str, name: &str) -> Option<SocketAddr> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    line[start..]
        .split_whitespace()
        .next()?
        .split(',')
        .next()?
        .parse()
        .ok()
}

impl Gateway {
    /// Starts smsgw with [`config`] in a fresh directory.
    pub fn start(name: &str, sip_extra: &str) -> Self {
        let dir = temp_dir(name);
        Self::start_in(dir.clone(), &config(&dir.join("data"), sip_extra))
    }

    pub fn start_in(dir: PathBuf, config_text: &str) -> Self {
        let config_path = dir.join("smsgw.toml");
        std::fs::write(&config_path, config_text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_smsgw"))
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start smsgw");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("smsgw ready") {
                    let _ = tx.send(line.clone());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("smsgw did not become ready:\n{}", log.lock().unwrap()));
        Self {
            child,
            dir,
            sip_udp: field(&ready, "sip_udp").expect("sip_udp"),
            sip_tcp: field(&ready, "sip_tcp").expect("sip_tcp"),
            admin: field(&ready, "admin").expect("admin"),
            webhook: field(&ready, "webhook").expect("webhook"),
            log,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "smsgw did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET on the admin listener; returns (status, body).
    pub fn admin_get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        http_get(self.admin, path, token)
    }

    pub fn registrations(&self) -> Vec<serde_json::Value> {
        let (status, body) = self.admin_get("/api/registrations", Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The registrations of one extension.
    pub fn registrations_of(&self, ext: &str) -> Vec<serde_json::Value> {
        self.registrations()
            .into_iter()
            .filter(|r| r["extension"] == ext)
            .collect()
    }

    /// The value of one metric sample line (`name{labels}`), 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics", None);
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let resp = String::from_utf8_lossy(&raw).into_owned();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Runs a peer program, failing the test with an install hint if it is missing.
pub fn run_peer(program: &str, args: &[String], hint: &str) -> Output {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); {hint}"));
    out
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A free loopback port for a peer to bind (the peer binds it right after).
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP port that is free now and below the kernel's ephemeral range, so that no socket bound to
/// port 0 meanwhile (by this or a concurrent test) can take it: for checking that a port stays free.
pub fn free_port_outside_ephemeral() -> u16 {
    let ephemeral_from: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let span = u32::from(ephemeral_from.max(2048)) - 1024;
    let offset = std::process::id() % span;
    (0..span)
        .map(|i| (1024 + (offset + i) % span) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port below the ephemeral range")
}

pub const SIPSAK_HINT: &str = "install it with: apt-get install sipsak";
pub const NETSIP_HINT: &str = "install it with: apt-get install libnet-sip-perl";
pub const PJSUA_HINT: &str = "create the venv with: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt";

/// sipsak usrloc mode: REGISTER with digest (sipsak only does MD5) and the given expiry.
pub fn sipsak_register(
    gw: SocketAddr,
    transport: &str,
    ext: &str,
    password: &str,
    expires: u32,
) -> Output {
    let port = free_port();
    let contact = if transport == "tcp" {
        format!("sip:{ext}@127.0.0.1:{port};transport=tcp")
    } else {
        format!("sip:{ext}@127.0.0.1:{port}")
    };
    let args = vec![
        "-U".into(),
        "-C".into(),
        contact,
        "-s".into(),
        format!("sip:{ext}@{gw}"),
        "-u".into(),
        ext.into(),
        "-a".into(),
        password.into(),
        "-x".into(),
        expires.to_string(),
        "-E".into(),
        transport.into(),
        "-i".into(),
        "-vv".into(),
    ];
    run_peer("sipsak", &args, SIPSAK_HINT)
}

/// sipsak's default mode: one OPTIONS.
pub fn sipsak_options(gw: SocketAddr, transport: &str) -> Output {
    let args = vec![
        "-s".into(),
        format!("sip:ping@{gw}"),
        "-E".into(),
        transport.into(),
        "-i".into(),
        "-vv".into(),
    ];
    run_peer("sipsak", &args, SIPSAK_HINT)
}

/// Net::SIP REGISTER (see tests/peers/netsip-ua.pl).
pub fn netsip_register(
    gw: SocketAddr,
    transport: &str,
    ext: &str,
    password: &str,
    expires: u32,
    local_port: u16,
) -> Output {
    let script = workspace().join("tests/peers/netsip-ua.pl");
    let args = vec![
        script.display().to_string(),
        "register".into(),
        ext.into(),
        password.into(),
        "127.0.0.1".into(),
        gw.to_string(),
        format!("127.0.0.1:{local_port}"),
        expires.to_string(),
        transport.into(),
    ];
    run_peer("perl", &args, NETSIP_HINT)
}

/// The Python of the test venv (override with SMSGW_TEST_PYTHON).
pub fn python() -> String {
    std::env::var("SMSGW_TEST_PYTHON")
        .unwrap_or_else(|_| workspace().join(".venv/bin/python").display().to_string())
}

/// pjsua2-ua.py with the arguments that register `ext` at `gw` (see tests/peers/pjsua2-ua.py).
fn pjsua_args(gw: SocketAddr, transport: &str, ext: &str, password: &str) -> Vec<String> {
    vec![
        workspace()
            .join("tests/peers/pjsua2-ua.py")
            .display()
            .to_string(),
        "--user".into(),
        ext.into(),
        "--password".into(),
        password.into(),
        "--domain".into(),
        "127.0.0.1".into(),
        "--registrar".into(),
        gw.to_string(),
        "--transport".into(),
        transport.into(),
    ]
}

/// pjsip REGISTER.
pub fn pjsua_register(
    gw: SocketAddr,
    transport: &str,
    ext: &str,
    password: &str,
    keep: bool,
) -> Output {
    let mut args = pjsua_args(gw, transport, ext, password);
    if keep {
        args.push("--keep".into());
    }
    run_peer(&python(), &args, PJSUA_HINT)
}

// ---- Messaging: the Twilio stand-in, webhooks, and peers that send and receive ----------

pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const AUTH_TOKEN: &str = "test-auth-token-0123456789";
pub const SERVICE_SID: &str = "MG0123456789abcdef0123456789abcdef";
/// Extension 101's DID; 102 has two.
pub const DID_101: &str = "+15017122661";
pub const DID_102_A: &str = "+15017122662";
pub const DID_102_B: &str = "+15017122663";
/// An account number that no extension owns.
pub const DID_SPARE: &str = "+15017122669";

/// `smsgw twilio-sim` as a separate process, checking requests against Twilio's OpenAPI file.
pub struct Sim {
    child: Child,
    pub addr: SocketAddr,
}

impl Sim {
    pub fn start() -> Self {
        let spec = workspace().join("tests/data/twilio/twilio_api_v2010.json");
        let mut child = Command::new(env!("CARGO_BIN_EXE_smsgw"))
            .args([
                "twilio-sim",
                "--listen",
                "127.0.0.1:0",
                "--account-sid",
                ACCOUNT_SID,
                "--auth-token",
                AUTH_TOKEN,
            ])
            .args([
                "--number", DID_101, "--number", DID_102_A, "--number", DID_102_B, "--number",
                DID_SPARE,
            ])
            .args(["--callback-delay-ms", "100", "--spec"])
            .arg(spec)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the stand-in");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let _ = tx.send(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    );
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("stand-in ready")
            .parse()
            .unwrap();
        Self { child, addr }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = http_get(self.addr, path, None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// POSTs to Messages.json that Twilio accepted or refused (not GETs).
    pub fn sends(&self) -> Vec<serde_json::Value> {
        self.get_json("/_sim/requests")
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["method"] == "POST" && r["path"].as_str().unwrap().ends_with("/Messages.json")
            })
            .cloned()
            .collect()
    }

    /// The first request sent to the stand-in with form parameter `name` = `value`.
    pub fn send_with(&self, name: &str, value: &str) -> Option<serde_json::Value> {
        self.sends().into_iter().find(|s| {
            s["form"]
                .as_array()
                .is_some_and(|f| f.iter().any(|p| p[0] == name && p[1] == value))
        })
    }

    pub fn messages(&self) -> Vec<serde_json::Value> {
        self.get_json("/_sim/messages").as_array().unwrap().clone()
    }

    pub fn violations(&self) -> Vec<serde_json::Value> {
        self.get_json("/_sim/violations")
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn media_fetches(&self) -> Vec<serde_json::Value> {
        self.get_json("/_sim/media-fetches")
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn set_mode(&self, mode: serde_json::Value) {
        let (status, body) = http_request(
            self.addr,
            "POST",
            "/_sim/mode",
            None,
            "application/json",
            mode.to_string().as_bytes(),
            &[],
        );
        assert_eq!(status, 200, "{body}");
    }

    /// Has the stand-in post an inbound SMS (signed as Twilio does) to `url`.
    pub fn inbound(&self, mut req: serde_json::Value, url: &str) -> serde_json::Value {
        req["url"] = url.into();
        let (status, body) = http_request(
            self.addr,
            "POST",
            "/_sim/inbound",
            None,
            "application/json",
            req.to_string().as_bytes(),
            &[],
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with the stand-in as Twilio, rules for North America, the UK (Sender ID) and
/// Germany (Messaging Service), and trunk "pbx" = 127.0.0.2.
pub fn messaging_config(data_dir: &Path, sim: &Sim, extra: &str) -> String {
    let base = config(data_dir, "");
    let base = base
        .replace(
            "dids = [\"+15017122661\"]\n",
            &format!("dids = [\"{DID_101}\"]\n"),
        )
        .replace(
            "id = \"102\"\npassword = \"pw102\"\n",
            &format!(
                "id = \"102\"\npassword = \"pw102\"\ndids = [\"{DID_102_A}\", \"{DID_102_B}\"]\n"
            ),
        );
    format!(
        r#"{base}
[[trunks]]
name = "pbx"
allow = ["127.0.0.2/32"]
uri = "sip:127.0.0.2:5099"

[[sms]]
name = "main"
account_sid = "{ACCOUNT_SID}"
auth_token = "{AUTH_TOKEN}"
dids = ["{DID_101}", "{DID_102_A}", "{DID_102_B}", "{DID_SPARE}"]
sender_id = "ACME"
messaging_service_sid = "{SERVICE_SID}"
allowed_countries = ["US", "CA", "GB", "DE"]
api_base = "{sim}"
messages_per_second = 500
validity_period = 600
help_reply = "Help: call us"

[[outbound_rules]]
name = "pbx"
from = ["trunk:pbx"]
to = "^\\+?1?([2-9]\\d{{9}})$"
rewrite = "+1$1"
sms = "main"
sender = "did:{DID_101}"

[[outbound_rules]]
name = "uk"
to = "^(?:\\+|011|00)44(\\d{{9,10}})$"
rewrite = "+44$1"
sms = "main"
sender = "sender_id"

[[outbound_rules]]
name = "germany"
to = "^\\+49(\\d{{6,13}})$"
rewrite = "+49$1"
sms = "main"
sender = "messaging_service"

[[outbound_rules]]
name = "north-america"
to = "^\\+?1?([2-9]\\d{{9}})$"
rewrite = "+1$1"
sms = "main"
sender = "extension"

[[outbound_rules]]
name = "any"
to = "^\\+([1-9]\\d{{7,14}})$"
rewrite = "+$1"
sms = "main"
sender = "extension"

{extra}
"#,
        sim = sim.base()
    )
}

impl Gateway {
    /// The webhook URL of SMS configuration `name`, as the admin API reports it (`public_url`
    /// there is the webhook listener itself, so Twilio's signature matches).
    pub fn webhook_url(&self) -> String {
        let (status, body) = self.admin_get("/api/sms-configs", Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "{body}");
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        list[0]["webhook_url"].as_str().unwrap().to_string()
    }

    pub fn messages(&self, query: &str) -> Vec<serde_json::Value> {
        let (status, body) = self.admin_get(&format!("/api/messages{query}"), Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Starts a gateway whose `public_url` is its own webhook listener (a free port chosen first).
    pub fn start_messaging(name: &str, sim: &Sim, extra: &str) -> Self {
        let dir = temp_dir(name);
        let text = messaging_text(&dir, sim, extra, free_tcp_port());
        Self::start_in(dir, &text)
    }

    pub fn restart(self, kill: bool) -> Self {
        let dir = self.dir.clone();
        let text = std::fs::read_to_string(dir.join("smsgw.toml")).unwrap();
        if kill {
            drop(self);
        } else {
            assert!(self.stop().success());
        }
        Self::start_in(dir, &text)
    }
}

pub fn messaging_text(dir: &Path, sim: &Sim, extra: &str, webhook_port: u16) -> String {
    messaging_config(&dir.join("data"), sim, extra)
        .replace(
            "public_url = \"http://127.0.0.1:1\"",
            &format!("public_url = \"http://127.0.0.1:{webhook_port}\""),
        )
        .replace(
            "webhook_listen = \"127.0.0.1:0\"",
            &format!("webhook_listen = \"127.0.0.1:{webhook_port}\""),
        )
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A raw HTTP/1.1 request; returns (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The signature Twilio's own RequestValidator computes.
pub fn twilio_signature(token: &str, url: &str, params: &[(&str, &str)]) -> String {
    let req = serde_json::json!({"token": token, "url": url, "params": params});
    let mut child = Command::new(python())
        .arg(workspace().join("tests/peers/twilio_sign.py"))
        .arg("sign")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run the venv's python ({e}); {PJSUA_HINT}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// POSTs a form to `url` (on `addr`) signed with `token` by Twilio's validator.
pub fn post_signed(
    addr: SocketAddr,
    url: &str,
    token: &str,
    params: &[(&str, &str)],
) -> (u16, String) {
    let sig = twilio_signature(token, url, params);
    let body: String = params
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
    http_request(
        addr,
        "POST",
        &path,
        None,
        "application/x-www-form-urlencoded",
        body.as_bytes(),
        &[("X-Twilio-Signature", &sig)],
    )
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// pjsip registers `ext`, optionally sends one MESSAGE, and listens for `listen` seconds.
pub fn pjsua(
    gw: SocketAddr,
    transport: &str,
    ext: &str,
    password: &str,
    send: Option<(&str, &str, &str)>,
    listen: f64,
) -> Output {
    let mut args = pjsua_args(gw, transport, ext, password);
    args.extend(["--keep".into(), "--listen".into(), listen.to_string()]);
    if let Some((uri, text, content_type)) = send {
        args.extend([
            "--send".into(),
            uri.into(),
            text.into(),
            "--content-type".into(),
            content_type.into(),
        ]);
    }
    run_peer(&python(), &args, PJSUA_HINT)
}

/// The same, in the background; `wait_output` collects it.
pub fn pjsua_background(
    gw: SocketAddr,
    transport: &str,
    ext: &str,
    password: &str,
    listen: f64,
) -> Child {
    Command::new(python())
        .args(pjsua_args(gw, transport, ext, password))
        .args(["--keep", "--listen", &listen.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run pjsua2 ({e}); {PJSUA_HINT}"))
}

/// Net::SIP registers `ext` and answers every MESSAGE with `code` for `seconds`.
pub fn netsip_listener(
    gw: SocketAddr,
    ext: &str,
    password: &str,
    seconds: u32,
    code: u16,
) -> Child {
    Command::new("perl")
        .arg(workspace().join("tests/peers/netsip-ua.pl"))
        .args(["reglisten", ext, password, "127.0.0.1"])
        .arg(gw.to_string())
        .arg(format!("127.0.0.1:{}", free_port()))
        .args([seconds.to_string(), code.to_string(), "udp".into()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run Net::SIP ({e}); {NETSIP_HINT}"))
}

/// Net::SIP as a PBX trunk peer bound to `local` (no registration), answering every MESSAGE
/// with 200 for `seconds`.
pub fn netsip_trunk(local: &str, seconds: u32) -> Child {
    Command::new("perl")
        .arg(workspace().join("tests/peers/netsip-ua.pl"))
        .args(["listen", local, &seconds.to_string(), "200", "udp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run Net::SIP ({e}); {NETSIP_HINT}"))
}

/// Polls `check` every 100 ms until it returns Some, for at most `secs`.
pub fn eventually<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
