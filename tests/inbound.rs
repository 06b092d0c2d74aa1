//! Black-box, inbound: Twilio's signed webhooks reach registered SIP clients nobody here wrote
//! (pjsip, Net::SIP) exactly once — now if they are online, later if not — and nothing unsigned
//! gets in.

mod common;
use common::*;

fn sms(from: &str, to: &str, body: &str) -> serde_json::Value {
    serde_json::json!({"from": from, "to": to, "body": body})
}

fn output(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    text(&out)
}

#[test]
fn a_webhook_reaches_the_phone_and_the_reply_goes_out_from_the_same_did() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("in-basic", &sim, "");
    let phone = pjsua_background(gw.sip_udp, "udp", "102", "pw102", 4.0);
    eventually(10, "102 registered", || {
        Some(()).filter(|_| !gw.registrations_of("102").is_empty())
    });
    // Extension 102 has two DIDs; the text arrives on the second.
    let r = sim.inbound(
        sms("+15550001111", DID_102_B, "Hi 102, it's Ann"),
        &gw.webhook_url(),
    );
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(
        r["body"],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>"
    );
    let out = output(phone);
    assert!(
        out.contains("RECEIVED from=\"+15550001111\" <sip:+15550001111@127.0.0.1> ct=text/plain body=Hi 102, it's Ann"),
        "{out}"
    );
    eventually(5, "delivered in history", || {
        gw.messages("?direction=inbound")
            .into_iter()
            .find(|m| m["status"] == "delivered")
    });
    // The phone replies to the number it sees: smsgw sends it from the DID Ann texted.
    let uri = format!("sip:+15550001111@{}", gw.sip_udp);
    let out = pjsua(
        gw.sip_udp,
        "udp",
        "102",
        "pw102",
        Some((&uri, "Hi Ann", "text/plain")),
        0.0,
    );
    assert!(text(&out).contains("MESSAGE -> 202"), "{}", text(&out));
    let sends = sim.sends();
    let from: Vec<&str> = sends[0]["form"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[0] == "From")
        .map(|p| p[1].as_str().unwrap())
        .collect();
    assert_eq!(from, [DID_102_B]);
}

#[test]
fn duplicates_and_forgeries_deliver_nothing_more() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("in-dup", &sim, "");
    let phone = pjsua_background(gw.sip_udp, "udp", "101", "pw101", 5.0);
    eventually(10, "101 registered", || {
        Some(()).filter(|_| !gw.registrations_of("101").is_empty())
    });
    let url = gw.webhook_url();
    let mut first = sms("+15550002222", DID_101, "only once");
    first["message_sid"] = "SM11111111111111111111111111111111".into();
    assert_eq!(sim.inbound(first.clone(), &url)["status"], 200);
    // Twilio retries with the same MessageSid: answered 200, not delivered again.
    assert_eq!(sim.inbound(first, &url)["status"], 200);
    // A forged signature, a wrong token: 403 and nothing stored.
    let mut forged = sms("+15550002222", DID_101, "forged");
    forged["sign_with"] = "not-the-auth-token".into();
    assert_eq!(sim.inbound(forged, &url)["status"], 403);
    let out = output(phone);
    assert_eq!(out.matches("RECEIVED").count(), 1, "{out}");
    assert!(out.contains("body=only once"), "{out}");
    assert!(!out.contains("forged"));
    assert_eq!(gw.messages("?direction=inbound").len(), 1);
    assert_eq!(
        gw.metric("smsgw_webhooks_total{outcome=\"duplicate\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("smsgw_webhooks_total{outcome=\"bad_signature\"}"),
        1.0
    );
}

#[test]
fn an_offline_phone_gets_its_texts_after_registering_even_across_a_restart() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("in-offline", &sim, "");
    let url = gw.webhook_url();
    for i in 1..=3 {
        assert_eq!(
            sim.inbound(
                sms("+15550003333", DID_101, &format!("while away {i}")),
                &url
            )["status"],
            200
        );
    }
    let pending = gw.messages("?direction=inbound&status=pending");
    assert_eq!(pending.len(), 3);
    // Restart (kill -9) with the inbox full; the webhook URL stays the same.
    let gw = gw.restart(true);
    assert_eq!(gw.webhook_url(), url);
    let out = output(pjsua_background(gw.sip_tcp, "tcp", "101", "pw101", 4.0));
    let received: Vec<&str> = out.lines().filter(|l| l.starts_with("RECEIVED")).collect();
    assert_eq!(received.len(), 3, "{out}");
    for (i, line) in received.iter().enumerate() {
        assert!(
            line.ends_with(&format!("body=while away {}", i + 1)),
            "order: {out}"
        );
    }
    // Over TCP, it came back on the phone's own connection: no second connection was opened.
    assert_eq!(gw.metric("smsgw_sip_tcp_connections"), 1.0);
    eventually(5, "all delivered", || {
        Some(()).filter(|_| gw.messages("?direction=inbound&status=delivered").len() == 3)
    });
}

#[test]
fn trunk_forward_and_long_texts_reach_their_targets() {
    let sim = Sim::start();
    let rule = format!(
        "[[inbound_rules]]\nname = \"to the pbx\"\ndid = [\"{DID_SPARE}\"]\nto = [\"trunk:pbx\"]\n\n\
         [[inbound_rules]]\nname = \"to a mobile\"\ndid = [\"{DID_102_A}\"]\nto = [\"forward:+15557654321\"]\n"
    );
    let gw = Gateway::start_messaging("in-trunk", &sim, &rule);
    // The trunk peer of the test config: sip:127.0.0.2:5099.
    let pbx = netsip_trunk("127.0.0.2:5099", 6);
    eventually(5, "the PBX listening", || {
        std::net::UdpSocket::bind("127.0.0.2:5099")
            .err()
            .map(|_| ())
    });
    let phone = netsip_listener(gw.sip_udp, "101", "pw101", 6, 200);
    eventually(10, "101 registered", || {
        Some(()).filter(|_| !gw.registrations_of("101").is_empty())
    });
    let url = gw.webhook_url();
    let long: String = (0..400)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(long.len() > 1300);
    assert_eq!(
        sim.inbound(sms("+15550004444", DID_101, &long), &url)["status"],
        200
    );
    assert_eq!(
        sim.inbound(sms("+15550004444", DID_SPARE, "for the pbx"), &url)["status"],
        200
    );
    assert_eq!(
        sim.inbound(sms("+15550004444", DID_102_A, "call me"), &url)["status"],
        200
    );
    eventually(10, "both delivered", || {
        Some(()).filter(|_| gw.messages("?direction=inbound&status=delivered").len() == 2)
    });
    // A forward target is an SMS from the DID that was texted, saying who wrote.
    let forwarded = eventually(10, "the forward sent", || {
        sim.send_with("To", "+15557654321")
    });
    let form = forwarded["form"].as_array().unwrap();
    let param = |k: &str| {
        form.iter()
            .find(|p| p[0] == k)
            .map(|p| p[1].as_str().unwrap())
    };
    assert_eq!(param("From"), Some(DID_102_A));
    assert_eq!(param("Body"), Some("From +15550004444: call me"));
    let out = output(phone);
    // Over UDP a MESSAGE stays under 1300 bytes: the text came in parts, in order, whole.
    let parts: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("MESSAGE from="))
        .filter_map(|l| l.split_once(" body=").map(|(_, b)| b))
        .collect();
    assert!(parts.len() >= 2, "not split: {out}");
    assert_eq!(parts.concat(), long, "{out}");
    let out = output(pbx);
    let line = out
        .lines()
        .find(|l| l.contains("body=for the pbx"))
        .unwrap_or_else(|| panic!("the PBX got nothing: {out}"));
    assert!(line.contains(&format!("to=<sip:{DID_SPARE}@")), "{line}");
    assert!(
        line.contains("from=\"+15550004444\" <sip:+15550004444@"),
        "{line}"
    );
}

#[test]
fn a_phone_answering_480_is_retried_then_the_text_expires() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging(
        "in-480",
        &sim,
        "[messaging]\ninbox_retry_secs = 1\ninbox_ttl_secs = 4",
    );
    let phone = netsip_listener(gw.sip_udp, "101", "pw101", 8, 480);
    eventually(10, "101 registered", || {
        Some(()).filter(|_| !gw.registrations_of("101").is_empty())
    });
    assert_eq!(
        sim.inbound(
            sms("+15550004444", DID_101, "are you there"),
            &gw.webhook_url()
        )["status"],
        200
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let expired = loop {
        if let Some(m) = gw
            .messages("?direction=inbound&status=expired")
            .into_iter()
            .next()
        {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not expired: {:?}\n{}",
            gw.messages("?direction=inbound"),
            gw.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let out = output(phone);
    assert!(out.matches("MESSAGE from=").count() >= 2, "retried: {out}");
    assert!(out.contains("body=are you there"), "{out}");
    assert_eq!(expired["body"], "are you there");
    assert!(gw.metric("smsgw_sip_deliveries_total{code=\"480\"}") >= 2.0);
}

#[test]
fn stop_is_recorded_and_later_texts_to_that_number_are_refused() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("in-stop", &sim, "");
    let url = gw.webhook_url();
    assert_eq!(
        sim.inbound(sms("+15550005555", DID_101, "stop"), &url)["status"],
        200
    );
    let m = &gw.messages("?direction=inbound")[0];
    assert_eq!(m["kind"], "opt-out");
    let to = format!("sip:+15550005555@{}", gw.sip_udp);
    let out = pjsua(
        gw.sip_udp,
        "udp",
        "101",
        "pw101",
        Some((&to, "are you sure?", "text/plain")),
        0.0,
    );
    assert!(
        text(&out).contains("MESSAGE -> 403") && text(&out).contains("opted out"),
        "{}",
        text(&out)
    );
    assert!(sim.sends().is_empty());
    // START lifts it.
    assert_eq!(
        sim.inbound(sms("+15550005555", DID_101, "START"), &url)["status"],
        200
    );
    let out = pjsua(
        gw.sip_udp,
        "udp",
        "101",
        "pw101",
        Some((&to, "welcome back", "text/plain")),
        0.0,
    );
    assert!(text(&out).contains("MESSAGE -> 202"), "{}", text(&out));
    // HELP gets the configured auto-reply from the DID.
    assert_eq!(
        sim.inbound(sms("+15550006666", DID_101, "help"), &url)["status"],
        200
    );
    eventually(10, "help reply sent", || {
        sim.send_with("Body", "Help: call us")
    });
}

#[test]
fn mms_links_fetch_the_media_and_unroutable_texts_show_in_history() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("in-mms", &sim, "");
    let url = gw.webhook_url();
    let phone = pjsua_background(gw.sip_udp, "udp", "101", "pw101", 4.0);
    eventually(10, "101 registered", || {
        Some(()).filter(|_| !gw.registrations_of("101").is_empty())
    });
    let mut mms = sms("+15550007777", DID_101, "look");
    mms["media"] = 1.into();
    assert_eq!(sim.inbound(mms, &url)["status"], 200);
    let out = output(phone);
    let line = out
        .lines()
        .find(|l| l.starts_with("RECEIVED"))
        .unwrap_or_else(|| panic!("{out}"));
    let link = line.split("\\n").nth(1).unwrap_or_else(|| panic!("{line}"));
    assert!(
        link.starts_with(&format!("http://{}/media/", gw.webhook)),
        "{link}"
    );
    let path = link.splitn(4, '/').nth(3).unwrap();
    let (status, body) = http_get(gw.webhook, &format!("/{path}"), None);
    assert_eq!(status, 200);
    assert!(body.contains("PNG"));
    assert_eq!(http_get(gw.webhook, "/media/not-a-token", None).0, 404);

    // Nobody owns the spare DID and no rule claims it.
    assert_eq!(
        sim.inbound(sms("+15550008888", DID_SPARE, "anyone?"), &url)["status"],
        200
    );
    let unroutable = gw.messages("?status=unroutable");
    assert_eq!(unroutable.len(), 1);
    assert_eq!(unroutable[0]["sender"], DID_SPARE);
}

#[test]
fn bad_webhooks_are_refused_with_the_reason() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("in-bad", &sim, "");
    let url = gw.webhook_url();
    let full = [
        ("AccountSid", ACCOUNT_SID),
        ("MessageSid", "SM22222222222222222222222222222222"),
        ("From", "+15550009999"),
        ("To", DID_101),
        ("Body", "hi"),
    ];
    for missing in ["MessageSid", "From", "To"] {
        let params: Vec<_> = full
            .iter()
            .copied()
            .filter(|(k, _)| *k != missing)
            .collect();
        let (status, body) = post_signed(gw.webhook, &url, AUTH_TOKEN, &params);
        assert_eq!(status, 400, "without {missing}: {body}");
    }
    let mut bad_to = full.to_vec();
    bad_to[3] = ("To", "5017122661");
    assert_eq!(post_signed(gw.webhook, &url, AUTH_TOKEN, &bad_to).0, 400);
    let mut wrong_account = full.to_vec();
    wrong_account[0] = ("AccountSid", "ACffffffffffffffffffffffffffffffff");
    assert_eq!(
        post_signed(gw.webhook, &url, AUTH_TOKEN, &wrong_account).0,
        403
    );
    let unknown = url.replace("/twilio/sms/", "/twilio/sms/x");
    assert_eq!(post_signed(gw.webhook, &unknown, AUTH_TOKEN, &full).0, 404);
    let huge = "x".repeat(70 * 1024);
    let mut big = full.to_vec();
    big[4] = ("Body", &huge);
    assert_eq!(post_signed(gw.webhook, &url, AUTH_TOKEN, &big).0, 413);
    // Unsigned: 403. Unknown extra parameters are fine and signed over.
    let path = url.splitn(4, '/').nth(3).unwrap();
    let (status, _) = http_request(
        gw.webhook,
        "POST",
        &format!("/{path}"),
        None,
        "application/x-www-form-urlencoded",
        b"MessageSid=SM1&From=%2B1&To=%2B1",
        &[],
    );
    assert_eq!(status, 403);
    let mut extra = full.to_vec();
    extra.push(("SomethingNew", "Twilio adds parameters"));
    assert_eq!(post_signed(gw.webhook, &url, AUTH_TOKEN, &extra).0, 200);
    assert!(gw.messages("?direction=inbound").len() == 1);
}

#[test]
fn the_signature_check_agrees_with_twilios_request_validator() {
    // Twilio's own RequestValidator signs random URLs (ports, queries) and bodies (repeated
    // keys, non-ASCII); smsgw must accept exactly those and refuse any one-character change.
    let out = std::process::Command::new(python())
        .arg(workspace().join("tests/peers/twilio_sign.py"))
        .args(["cases", "300", "7"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cases.len(), 300);
    let mut checked = 0;
    for c in &cases {
        let token = c["token"].as_str().unwrap();
        let url = c["url"].as_str().unwrap();
        let sig = c["signature"].as_str().unwrap();
        let params: Vec<(String, String)> = c["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert!(
            smsgw::twilio::signature::validate(token, url, &params, None, sig),
            "refused a valid case: {c}"
        );
        // One character changed in the URL, in a value, in the signature: all refused.
        let mut bad_url = url.to_string();
        bad_url.push('x');
        assert!(
            !smsgw::twilio::signature::validate(token, &bad_url, &params, None, sig),
            "{c}"
        );
        if let Some((k, v)) = params.first() {
            let mut changed = params.clone();
            changed[0] = (k.clone(), format!("{v}!"));
            assert!(
                !smsgw::twilio::signature::validate(token, url, &changed, None, sig),
                "{c}"
            );
        }
        let mut bad_sig: Vec<char> = sig.chars().collect();
        bad_sig[3] = if bad_sig[3] == 'A' { 'B' } else { 'A' };
        let bad_sig: String = bad_sig.into_iter().collect();
        assert!(
            !smsgw::twilio::signature::validate(token, url, &params, None, &bad_sig),
            "{c}"
        );
        checked += 1;
    }
    assert_eq!(checked, 300);
}
