//! Black-box: the command line — `check` reports every problem, `run` refuses before binding.

mod common;
use common::*;
use std::process::Command;

fn smsgw(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_example_configs() {
    let demo = workspace().join("conf/demo.toml");
    let out = smsgw(&["check", "--config", demo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("OK (2 extensions"), "{}", text(&out));

    let prod = workspace().join("conf/smsgw.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(["check", "--config", prod.to_str().unwrap()])
        .env("SMSGW_ADMIN_TOKEN", "t")
        .env("EXT101_PASSWORD", "a")
        .env("EXT102_PASSWORD", "b")
        .env("TWILIO_AUTH_TOKEN", "c")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Without its environment the same file names each missing variable.
    let out = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(["check", "--config", prod.to_str().unwrap()])
        .env_remove("SMSGW_ADMIN_TOKEN")
        .env_remove("TWILIO_AUTH_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let t = text(&out);
    assert!(
        t.contains("http.admin_token: environment variable SMSGW_ADMIN_TOKEN is not set"),
        "{t}"
    );
    assert!(
        t.contains("sms[0].auth_token: environment variable TWILIO_AUTH_TOKEN is not set"),
        "{t}"
    );
}

#[test]
fn check_and_run_report_every_problem_and_run_binds_nothing() {
    let dir = temp_dir("cli-bad");
    let port = free_port_outside_ephemeral();
    let bad = config(&dir.join("data"), "")
        .replace("udp:127.0.0.1:0", "udp:127.0.0.1:notaport")
        .replace(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"127.0.0.1:{port}\""),
        )
        .replace(
            "password = \"pw102\"",
            "password = \"pw102\"\ncolour = \"blue\"",
        )
        .replace("dids = [\"+15017122661\"]", "dids = [\"15017122661\"]");
    let path = dir.join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    for cmd in ["check", "run"] {
        let out = smsgw(&[cmd, "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{cmd}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains("3 problem(s)"), "{t}");
        assert!(t.contains("sip.listen[0]"), "{t}");
        assert!(t.contains("extensions[1].colour: unknown key"), "{t}");
        assert!(t.contains("extensions[0].dids[0]"), "{t}");
        assert!(!t.contains("smsgw ready"), "{t}");
    }
    // Nothing was bound: the admin port is still free.
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[test]
fn run_names_the_listener_it_cannot_bind() {
    let dir = temp_dir("cli-busy");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let text_cfg = config(&dir.join("data"), "").replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!("admin_listen = \"{addr}\""),
    );
    let path = dir.join("busy.toml");
    std::fs::write(&path, text_cfg).unwrap();
    let out = smsgw(&["run", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains(&format!("cannot listen on http.admin_listen = {addr}")),
        "{t}"
    );
}

#[test]
fn sigterm_stops_cleanly() {
    let gw = Gateway::start("sigterm", "");
    let status = gw.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn webhook_url_is_stable_and_verify_checks_and_sets_the_numbers() {
    let sim = Sim::start();
    let dir = temp_dir("cli-verify");
    let config_text = messaging_text(&dir, &sim, "", free_tcp_port());
    let path = dir.join("smsgw.toml");
    std::fs::write(&path, &config_text).unwrap();
    let cfg = path.to_str().unwrap();
    let url = |extra: &[&str]| {
        let mut args = vec!["webhook-url", "--config", cfg];
        args.extend_from_slice(extra);
        let out = smsgw(&args);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let first = url(&[]);
    assert!(first.starts_with("main\thttp://127.0.0.1:"), "{first}");
    let token = first.trim().rsplit('/').next().unwrap().to_string();
    assert!(token.len() >= 22, "at least 128 bits: {token}");
    assert_eq!(url(&["main"]), first, "stable across runs");
    let rotated = url(&["main", "--rotate"]);
    assert_ne!(rotated, first);
    assert!(!smsgw(&["webhook-url", "--config", cfg, "nope"])
        .status
        .success());

    // verify: the stand-in's numbers have no webhook yet.
    let out = smsgw(&["verify", "--config", cfg, "main"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("credentials OK: 4 numbers"), "{t}");
    assert!(
        t.contains(&format!(
            "PROBLEM {DID_101}: messaging webhook is not smsgw's"
        )),
        "{t}"
    );
    let out = smsgw(&["verify", "--config", cfg, "main", "--apply"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("SET     {DID_101}")));
    let out = smsgw(&["verify", "--config", cfg, "main"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(rotated.trim().split('\t').nth(1).unwrap()));
    // Wrong credentials are named as such.
    let bad = config_text.replace(
        "auth_token = \"test-auth-token-0123456789\"",
        "auth_token = \"wrong\"",
    );
    std::fs::write(&path, bad).unwrap();
    let out = smsgw(&["verify", "--config", cfg, "main"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("20003"), "{}", text(&out));
}
