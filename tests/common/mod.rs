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
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
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

const SIPSAK_HINT: &str = "install it with: apt-get install sipsak";
const NETSIP_HINT: &str = "install it with: apt-get install libnet-sip-perl";
const PJSUA_HINT: &str = "create the venv with: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt";

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

/// pjsip REGISTER (see tests/peers/pjsua2-ua.py).
pub fn pjsua_register(
    gw: SocketAddr,
    transport: &str,
    ext: &str,
    password: &str,
    keep: bool,
) -> Output {
    let script = workspace().join("tests/peers/pjsua2-ua.py");
    let args = vec![
        script.display().to_string(),
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
    ];
    let args = if keep {
        args.into_iter().chain(["--keep".to_string()]).collect()
    } else {
        args
    };
    run_peer(&python(), &args, PJSUA_HINT)
}
