//! Black-box, outbound: texts typed in a real SIP client (pjsip) reach the Twilio stand-in from the
//! right sender exactly once, survive outages and restarts, and the outcome gets back to the phone.

mod common;
use common::*;

fn send(gw: &Gateway, to: &str, text: &str) -> String {
    let uri = format!("sip:{to}@{}", gw.sip_udp);
    let out = pjsua(
        gw.sip_udp,
        "udp",
        "101",
        "pw101",
        Some((&uri, text, "text/plain")),
        0.0,
    );
    text_of(&out)
}

fn text_of(out: &std::process::Output) -> String {
    text(out)
        .lines()
        .filter(|l| {
            l.starts_with("REGISTER") || l.starts_with("MESSAGE") || l.starts_with("RECEIVED")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn form<'a>(req: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    req["form"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p[0] == name)
        .map(|p| p[1].as_str().unwrap())
        .collect()
}

#[test]
fn a_text_reaches_twilio_once_from_the_extensions_did_and_is_delivered() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-basic", &sim, "");
    let out = send(&gw, "555-123-4567", "Hello from pjsip");
    assert!(out.contains("MESSAGE -> 202 Accepted"), "{out}");
    let sends = sim.sends();
    assert_eq!(sends.len(), 1, "{sends:?}");
    let req = &sends[0];
    assert_eq!(req["status"], 201);
    assert_eq!(req["auth_user"], ACCOUNT_SID);
    assert_eq!(form(req, "To"), ["+15551234567"]);
    assert_eq!(form(req, "From"), [DID_101]);
    assert_eq!(form(req, "Body"), ["Hello from pjsip"]);
    assert_eq!(form(req, "ValidityPeriod"), ["600"]);
    let callback = form(req, "StatusCallback")[0];
    assert!(
        callback.starts_with(&format!("http://{}/twilio/status/", gw.webhook)),
        "{callback}"
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    let m = eventually(10, "delivered", || {
        gw.messages("?direction=outbound")
            .into_iter()
            .find(|m| m["status"] == "delivered")
    });
    assert_eq!(m["twilio_sid"], sim.messages()[0]["sid"]);
    assert_eq!(m["segments"], 1);
}

#[test]
fn sender_id_messaging_service_and_sip_errors() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-senders", &sim, "");
    assert!(send(&gw, "011447911123456", "to the UK").contains("202"));
    assert!(send(&gw, "+4930123456", "to Germany").contains("202"));
    let sends = sim.sends();
    assert_eq!(form(&sends[0], "From"), ["ACME"]);
    assert_eq!(form(&sends[0], "To"), ["+447911123456"]);
    assert_eq!(form(&sends[1], "MessagingServiceSid"), [SERVICE_SID]);
    assert!(form(&sends[1], "From").is_empty());
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());

    // No rule: 404, nothing sent. Not permitted (Japan): 403. Twilio's magic numbers: mapped.
    let out = send(&gw, "1234", "nowhere");
    assert!(out.contains("MESSAGE -> 404"), "{out}");
    let out = send(&gw, "+81312345678", "to Japan");
    assert!(
        out.contains("MESSAGE -> 403") && out.contains("destination not permitted"),
        "{out}"
    );
    let out = send(&gw, "+15005550001", "magic invalid");
    assert!(
        out.contains("MESSAGE -> 484") && out.contains("21211"),
        "{out}"
    );
    let out = send(&gw, "+15005550003", "magic geo");
    assert!(
        out.contains("MESSAGE -> 403") && out.contains("21408"),
        "{out}"
    );
    let out = send(&gw, "+15005550009", "magic landline");
    assert!(
        out.contains("MESSAGE -> 488") && out.contains("21614"),
        "{out}"
    );
    // 21610 is remembered: the next text to that number is refused before reaching Twilio.
    let out = send(&gw, "+15005550004", "magic opted out");
    assert!(
        out.contains("MESSAGE -> 403") && out.contains("21610"),
        "{out}"
    );
    let before = sim.sends().len();
    let out = send(&gw, "+15005550004", "again");
    assert!(
        out.contains("MESSAGE -> 403") && out.contains("opted out"),
        "{out}"
    );
    assert_eq!(sim.sends().len(), before);
    let failed = gw.messages("?status=failed");
    assert!(
        failed.iter().any(|m| m["error_code"] == 21211),
        "{failed:?}"
    );
}

#[test]
fn typing_notices_never_reach_twilio_and_long_texts_are_split() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-composing", &sim, "");
    let uri = format!("sip:5551234567@{};transport=tcp", gw.sip_tcp);
    // pjsip sends its RFC 3994 isComposing MESSAGE when told the user is typing.
    let out = pjsua(
        gw.sip_tcp,
        "tcp",
        "101",
        "pw101",
        Some((&uri, "", "typing")),
        0.0,
    );
    assert!(
        text_of(&out).contains("MESSAGE -> typing sent"),
        "{}",
        text(&out)
    );
    eventually(5, "the isComposing answered 200", || {
        Some(()).filter(|_| {
            gw.metric("smsgw_sip_responses_total{method=\"MESSAGE\",code=\"200\"}") == 1.0
        })
    });
    assert!(sim.sends().is_empty());
    let long = "word ".repeat(340); // 1700 characters: over Twilio's 1600, under pjsip's packet limit
    let out = pjsua(
        gw.sip_tcp,
        "tcp",
        "101",
        "pw101",
        Some((&uri, &long, "text/plain")),
        0.0,
    );
    assert!(
        text_of(&out).contains("MESSAGE -> 202"),
        "{}",
        text_of(&out)
    );
    let sends = eventually(10, "two parts", || {
        Some(sim.sends()).filter(|s| s.len() == 2)
    });
    assert!(sends
        .iter()
        .all(|s| form(s, "Body")[0].chars().count() <= 1600));
    let stored = gw.messages("?direction=outbound");
    assert_eq!(stored.len(), 2);
    let mut segments: Vec<u64> = stored
        .iter()
        .map(|m| m["segments"].as_u64().unwrap())
        .collect();
    segments.sort();
    assert_eq!(segments, [1, 11]);
}

#[test]
fn twilio_down_then_back_sends_exactly_once_and_429_retry_after_is_honoured() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-down", &sim, "");
    sim.set_mode(serde_json::json!({"fail": "error500", "fail_count": 3}));
    let out = send(&gw, "5551230001", "survives an outage");
    assert!(out.contains("MESSAGE -> 202"), "{out}");
    eventually(30, "sent after the outage", || {
        Some(()).filter(|_| sim.messages().len() == 1)
    });
    let sends = sim.sends();
    assert_eq!(sends.iter().filter(|s| s["status"] == 500).count(), 3);
    assert_eq!(sends.iter().filter(|s| s["status"] == 201).count(), 1);

    sim.set_mode(serde_json::json!({"fail": "rate_limit", "fail_count": 1, "retry_after_secs": 3}));
    let out = send(&gw, "5551230002", "after a 429");
    assert!(out.contains("MESSAGE -> 202"), "{out}");
    eventually(20, "sent after the 429", || {
        Some(()).filter(|_| sim.messages().len() == 2)
    });
    let tries: Vec<u64> = sim
        .sends()
        .iter()
        .filter(|s| form(s, "Body") == ["after a 429"])
        .map(|s| s["at_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(tries.len(), 2, "{:?}", sim.sends());
    assert!(
        tries[1] - tries[0] >= 3000,
        "Retry-After not honoured: {tries:?}"
    );
    eventually(10, "both delivered", || {
        Some(()).filter(|_| gw.messages("?status=delivered").len() == 2)
    });
}

#[test]
fn status_callbacks_are_checked_and_only_move_forward() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-status", &sim, "");
    sim.set_mode(serde_json::json!({"no_callbacks": true}));
    assert!(send(&gw, "5551230003", "status test").contains("202"));
    // The phone hears Twilio's verdict before the SID is recorded.
    let m = &eventually(10, "the SID recorded", || {
        gw.messages("?direction=outbound")
            .into_iter()
            .find(|m| m["twilio_sid"].is_string())
    });
    let sid = m["twilio_sid"].as_str().unwrap().to_string();
    let url = sim.sends()[0]["form"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == "StatusCallback")
        .unwrap()[1]
        .as_str()
        .unwrap()
        .to_string();
    let params = |status: &'static str| {
        vec![
            ("AccountSid", ACCOUNT_SID),
            ("MessageSid", sid.as_str()),
            ("MessageStatus", status),
            ("To", "+15551230003"),
        ]
    };
    // A forged signature changes nothing.
    let (code, _) = post_signed(gw.webhook, &url, "not-the-token", &params("delivered"));
    assert_eq!(code, 403);
    assert_eq!(gw.messages("?direction=outbound")[0]["status"], "queued");
    assert!(gw.metric("smsgw_webhooks_total{outcome=\"bad_signature\"}") >= 1.0);
    // The callback URL carries our message id, so a callback finds its message without an
    // index on Twilio's SIDs; one without it (a message sent before ids were carried) is found
    // among its recipient's messages.
    let id = m["id"].as_i64().unwrap();
    assert!(url.ends_with(&format!("?m={id}")), "{url}");
    let bare = url.split('?').next().unwrap();
    let (code, body) = post_signed(gw.webhook, bare, AUTH_TOKEN, &params("sent"));
    assert!((200..300).contains(&code), "{code} {body}");
    assert_eq!(gw.messages("?direction=outbound")[0]["status"], "sent");
    for status in ["delivered", "sent", "undelivered"] {
        let (code, body) = post_signed(gw.webhook, &url, AUTH_TOKEN, &params(status));
        assert!((200..300).contains(&code), "{status}: {code} {body}");
    }
    assert_eq!(gw.messages("?direction=outbound")[0]["status"], "delivered");
}

#[test]
fn callbacks_that_overtake_twilios_answer_are_applied_once_the_sid_is_saved() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-early", &sim, "");
    // "sent" and "delivered" come 100 and 200 ms after the message is created, Twilio's answer
    // after 600 ms: both callbacks find the SID not saved yet.
    sim.set_mode(serde_json::json!({"answer_delay_ms": 600}));
    assert!(send(&gw, "5551230005", "overtaken").contains("202"));
    let m = eventually(10, "delivered", || {
        gw.messages("?direction=outbound")
            .into_iter()
            .find(|m| m["status"] == "delivered")
    });
    assert_eq!(m["twilio_sid"], sim.messages()[0]["sid"]);
}

#[test]
fn a_failure_reaches_the_phone_as_a_message() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-notice", &sim, "");
    sim.set_mode(serde_json::json!({"final_status": "undelivered", "error_code": 30007}));
    let uri = format!("sip:5551234567@{}", gw.sip_udp);
    let out = pjsua(
        gw.sip_udp,
        "udp",
        "101",
        "pw101",
        Some((&uri, "will be filtered", "text/plain")),
        4.0,
    );
    let out = text_of(&out);
    assert!(out.contains("MESSAGE -> 202"), "{out}");
    assert!(
        out.contains("RECEIVED from=<sip:smsgw@127.0.0.1> ct=text/plain body=Not delivered to +1 555 123 4567: 30007 message filtered by the carrier"),
        "{out}"
    );
    let failed = gw.messages("?status=undelivered");
    assert_eq!(failed[0]["error_code"], 30007);
}

#[test]
fn a_cpim_phone_asking_for_delivery_notifications_gets_an_imdn() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-imdn", &sim, "");
    let uri = format!("sip:5551234567@{}", gw.sip_udp);
    let cpim = "From: <sip:101@127.0.0.1>\r\nTo: <sip:+15551234567@127.0.0.1>\r\n\
                NS: imdn <urn:ietf:params:imdn>\r\nimdn.Message-ID: 34jk324j\r\n\
                DateTime: 2026-11-23T00:00:00Z\r\n\
                imdn.Disposition-Notification: positive-delivery, negative-delivery\r\n\r\n\
                Content-Type: text/plain;charset=utf-8\r\n\r\nHello via CPIM";
    let out = pjsua(
        gw.sip_udp,
        "udp",
        "101",
        "pw101",
        Some((&uri, cpim, "message/cpim")),
        4.0,
    );
    let out = text_of(&out);
    assert!(out.contains("MESSAGE -> 202"), "{out}");
    // Twilio got the text inside the CPIM wrapper; the phone got a positive delivery
    // notification about its own message, instead of a plain-text notice.
    assert_eq!(form(&sim.sends()[0], "Body"), ["Hello via CPIM"]);
    let imdn = out
        .lines()
        .find(|l| l.starts_with("RECEIVED") && l.contains("ct=message/cpim"))
        .unwrap_or_else(|| panic!("no IMDN: {out}"));
    assert!(imdn.contains("<message-id>34jk324j</message-id>"), "{imdn}");
    assert!(imdn.contains("<delivered/>"), "{imdn}");
    assert!(imdn.contains("Content-Type: message/imdn+xml"), "{imdn}");
    assert!(imdn.contains("from=<sip:+15551234567@"), "{imdn}");
}

#[test]
fn a_full_outbox_survives_kill_9_and_is_sent_once() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging(
        "out-restart",
        &sim,
        "[messaging]\nanswer = \"on_store\"\nretry_max_secs = 1",
    );
    sim.set_mode(serde_json::json!({"fail": "error500"}));
    for i in 0..3 {
        assert!(
            send(&gw, &format!("555123100{i}"), &format!("queued {i}")).contains("MESSAGE -> 202")
        );
    }
    assert_eq!(gw.messages("?direction=outbound").len(), 3);
    // Crash while Twilio is down, with everything in the outbox and some attempts in doubt.
    let gw = {
        let dir = gw.dir.clone();
        let text = std::fs::read_to_string(dir.join("smsgw.toml")).unwrap();
        drop(gw); // SIGKILL
        sim.set_mode(serde_json::json!({}));
        Gateway::start_in(dir, &text)
    };
    eventually(30, "all three sent", || {
        Some(()).filter(|_| sim.messages().len() >= 3)
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut bodies: Vec<String> = sim
        .messages()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["queued 0", "queued 1", "queued 2"]);
    eventually(10, "stored as sent", || {
        Some(()).filter(|_| {
            gw.messages("?direction=outbound")
                .iter()
                .all(|m| m["twilio_sid"].is_string())
        })
    });
}

#[test]
fn an_image_from_a_trunk_becomes_a_media_url_twilio_can_fetch() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-mms", &sim, "");
    // The trunk peer is 127.0.0.2: IP-authenticated, never challenged.
    let sock = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let png: &[u8] = b"\x89PNG\r\n\x1a\nnot-really-but-bytes";
    let head = format!(
        "MESSAGE sip:+15551234567@{gw_addr} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKmms1;rport\r\n\
         From: <sip:pbx@127.0.0.2>;tag=t1\r\nTo: <sip:+15551234567@{gw_addr}>\r\nCall-ID: mms1\r\nCSeq: 1 MESSAGE\r\n\
         Max-Forwards: 70\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
        png.len(),
        gw_addr = gw.sip_udp,
        me = sock.local_addr().unwrap(),
    );
    let mut datagram = head.into_bytes();
    datagram.extend_from_slice(png);
    sock.send_to(&datagram, gw.sip_udp).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("SIP/2.0 202"), "{resp}");
    let fetched = eventually(10, "the stand-in fetched the media", || {
        sim.media_fetches().into_iter().next()
    });
    assert_eq!(fetched["status"], 200);
    assert_eq!(fetched["bytes"].as_u64().unwrap() as usize, png.len());
    assert_eq!(fetched["content_type"], "image/png");
    let sends = sim.sends();
    assert_eq!(form(&sends[0], "MediaUrl").len(), 1);
    assert_eq!(form(&sends[0], "From"), [DID_101]);
    assert!(form(&sends[0], "Body").is_empty());
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

#[test]
fn the_admin_api_sends_through_the_same_path() {
    let sim = Sim::start();
    let gw = Gateway::start_messaging("out-api", &sim, "");
    let body = serde_json::json!({"extension": "102", "to": "5551239999", "body": "from the API"})
        .to_string();
    let (status, resp) = http_request(
        gw.admin,
        "POST",
        "/api/messages",
        Some(ADMIN_TOKEN),
        "application/json",
        body.as_bytes(),
        &[],
    );
    assert_eq!(status, 201, "{resp}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&resp).unwrap();
    assert_eq!(list[0]["sender"], DID_102_A);
    assert_eq!(list[0]["status"], "queued");
    let bad = serde_json::json!({"extension": "102", "to": "12", "body": "x"}).to_string();
    let (status, resp) = http_request(
        gw.admin,
        "POST",
        "/api/messages",
        Some(ADMIN_TOKEN),
        "application/json",
        bad.as_bytes(),
        &[],
    );
    assert_eq!(status, 422, "{resp}");
    let (status, _) = http_request(
        gw.admin,
        "POST",
        "/api/messages",
        None,
        "application/json",
        body.as_bytes(),
        &[],
    );
    assert_eq!(status, 401);
    assert_eq!(sim.sends().len(), 1);
}
