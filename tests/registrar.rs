//! Black-box: REGISTER from real SIP clients nobody here wrote (sipsak, Net::SIP, pjsip).

mod common;
use common::*;

/// sipsak only speaks MD5 and takes the first challenge, so it is an "old phone".
const MD5_ONLY: &str = "digest_md5_only = true";

#[test]
fn sipsak_registers_over_udp_and_tcp_and_is_listed() {
    let gw = Gateway::start("sipsak-reg", MD5_ONLY);
    let out = sipsak_register(gw.sip_udp, "udp", "101", "pw101", 300);
    assert!(out.status.success(), "{}", text(&out));
    let out = sipsak_register(gw.sip_tcp, "tcp", "102", "pw102", 300);
    assert!(out.status.success(), "{}", text(&out));

    let udp = gw.registrations_of("101");
    assert_eq!(udp.len(), 1, "{udp:?}");
    assert_eq!(udp[0]["transport"], "udp");
    assert!(udp[0]["contact"]
        .as_str()
        .unwrap()
        .starts_with("sip:101@127.0.0.1:"));
    assert!(udp[0]["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    let left = udp[0]["expires_in"].as_u64().unwrap();
    assert!((290..=300).contains(&left), "{left}");
    let tcp = gw.registrations_of("102");
    assert_eq!(tcp.len(), 1, "{tcp:?}");
    assert_eq!(tcp[0]["transport"], "tcp");
    assert_eq!(
        gw.metric("smsgw_sip_auth_successes_total{algorithm=\"MD5\"}"),
        2.0
    );
}

#[test]
fn wrong_password_is_refused_and_not_listed() {
    let gw = Gateway::start("wrong-pw", MD5_ONLY);
    let out = sipsak_register(gw.sip_udp, "udp", "101", "not-the-password", 300);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("403"), "{}", text(&out));
    // An extension that does not exist gets exactly the same answer.
    let out = sipsak_register(gw.sip_udp, "udp", "999", "whatever", 300);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("403 Forbidden (authentication failed)"),
        "{}",
        text(&out)
    );
    assert!(gw.registrations().is_empty());
    assert_eq!(
        gw.metric("smsgw_sip_auth_failures_total{reason=\"wrong_credentials\"}"),
        2.0
    );
}

#[test]
fn netsip_registers_and_unregisters_over_udp_and_tcp() {
    let gw = Gateway::start("netsip", "");
    let port = free_port();
    let out = netsip_register(gw.sip_udp, "udp", "101", "pw101", 300, port);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("REGISTER ok code=200 contacts=1"),
        "{}",
        text(&out)
    );
    let tcp_port = free_port();
    let out = netsip_register(gw.sip_tcp, "tcp", "101", "pw101", 300, tcp_port);
    assert!(out.status.success(), "{}", text(&out));
    let regs = gw.registrations_of("101");
    assert_eq!(regs.len(), 2, "{regs:?}");
    let mut transports: Vec<_> = regs
        .iter()
        .map(|r| r["transport"].as_str().unwrap())
        .collect();
    transports.sort();
    assert_eq!(transports, ["tcp", "udp"]);
    // Net::SIP skips the SHA-256 challenge and answers the MD5 one: both are offered.
    assert_eq!(
        gw.metric("smsgw_sip_auth_successes_total{algorithm=\"MD5\"}"),
        2.0
    );

    let out = netsip_register(gw.sip_udp, "udp", "101", "pw101", 0, port);
    assert!(out.status.success(), "{}", text(&out));
    let regs = gw.registrations_of("101");
    assert_eq!(regs.len(), 1, "{regs:?}");
    assert_eq!(regs[0]["transport"], "tcp");
}

#[test]
fn pjsip_registers_with_sha256_over_udp_and_tcp() {
    let gw = Gateway::start("pjsip", "");
    for (transport, addr) in [("udp", gw.sip_udp), ("tcp", gw.sip_tcp)] {
        let out = pjsua_register(addr, transport, "102", "pw102", true);
        assert!(
            text(&out).contains("REGISTER -> 200 OK"),
            "{transport}: {}",
            text(&out)
        );
    }
    assert_eq!(
        gw.metric("smsgw_sip_auth_successes_total{algorithm=\"SHA-256\"}"),
        2.0
    );
    let regs = gw.registrations_of("102");
    assert_eq!(regs.len(), 2, "{regs:?}");
    let out = pjsua_register(gw.sip_udp, "udp", "102", "wrong", true);
    assert!(text(&out).contains("REGISTER -> 403"), "{}", text(&out));
}

#[test]
fn repeated_failures_block_the_source_address() {
    let gw = Gateway::start(
        "guard",
        "auth_max_failures = 3\nauth_failure_window_secs = 60\nauth_block_secs = 300",
    );
    for _ in 0..3 {
        let out = netsip_register(gw.sip_udp, "udp", "101", "guess", 300, free_port());
        assert!(text(&out).contains("code=403"), "{}", text(&out));
    }
    // Now even the right password is refused from this address, without a challenge.
    let out = netsip_register(gw.sip_udp, "udp", "101", "pw101", 300, free_port());
    assert!(
        text(&out).contains("REGISTER failed code=403"),
        "{}",
        text(&out)
    );
    assert!(gw.metric("smsgw_sip_auth_blocked_total") >= 1.0);
    assert!(gw.registrations().is_empty());
}

#[test]
fn options_is_answered_over_udp_and_tcp() {
    let gw = Gateway::start("options", "");
    for (transport, addr) in [("udp", gw.sip_udp), ("tcp", gw.sip_tcp)] {
        let out = sipsak_options(addr, transport);
        assert!(out.status.success(), "{transport}: {}", text(&out));
        assert!(text(&out).contains("200 OK"), "{}", text(&out));
    }
    assert_eq!(
        gw.metric("smsgw_sip_requests_total{method=\"OPTIONS\"}"),
        2.0
    );
}

#[test]
fn too_short_expiry_gets_423() {
    let gw = Gateway::start("423", &format!("{MD5_ONLY}\nmin_expires = 120"));
    let out = sipsak_register(gw.sip_udp, "udp", "101", "pw101", 30);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("423 Interval Too Brief"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("Min-Expires: 120"), "{}", text(&out));
    assert!(gw.registrations().is_empty());
}

#[test]
fn registrations_survive_a_restart() {
    let gw = Gateway::start("restart", "");
    let out = netsip_register(gw.sip_udp, "udp", "101", "pw101", 600, free_port());
    assert!(out.status.success(), "{}", text(&out));
    let before = gw.registrations();
    assert_eq!(before.len(), 1);
    let dir = gw.dir.clone();
    assert!(gw.stop().success());
    let gw = Gateway::start_in(dir.clone(), &config(&dir.join("data"), ""));
    let after = gw.registrations();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["contact"], before[0]["contact"]);
    assert_eq!(after[0]["source"], before[0]["source"]);
    assert!(gw
        .log()
        .contains("restored registrations from the store bindings=1"));
}

#[test]
fn admin_api_needs_the_token() {
    let gw = Gateway::start("admin", "");
    assert_eq!(gw.admin_get("/api/registrations", None).0, 401);
    assert_eq!(gw.admin_get("/api/registrations", Some("wrong")).0, 401);
    assert_eq!(gw.admin_get("/healthz", None).0, 200);
    assert_eq!(gw.admin_get("/readyz", None).0, 200);
    // The webhook listener carries no admin routes.
    assert_eq!(
        http_get(gw.webhook, "/api/registrations", Some(ADMIN_TOKEN)).0,
        404
    );
}
