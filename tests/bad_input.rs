//! Black-box: malformed, truncated, oversized and hostile input over UDP and TCP. Nothing may
//! crash the gateway; a 400 goes back wherever a response is possible; good requests still work.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

fn request(method: &str, branch: &str, extra: &str, body: &str, transport: &str) -> String {
    format!(
        "{method} sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.1:9;branch=z9hG4bK{branch};rport\r\n\
         From: <sip:x@127.0.0.1>;tag=f\r\nTo: <sip:101@127.0.0.1>\r\nCall-ID: {branch}\r\n\
         CSeq: 1 {method}\r\nMax-Forwards: 70\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn udp_exchange(sock: &UdpSocket, gw: std::net::SocketAddr, data: &[u8]) -> Option<String> {
    sock.send_to(data, gw).unwrap();
    let mut buf = vec![0u8; 65_536];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(_) => None,
    }
}

#[test]
fn udp_garbage_truncation_and_missing_headers() {
    let gw = Gateway::start("bad-udp", "");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();

    // Not SIP at all, or not a complete header section: nothing to answer.
    assert_eq!(
        udp_exchange(&sock, gw.sip_udp, b"\x00\x01\x02\xff garbage"),
        None
    );
    assert_eq!(udp_exchange(&sock, gw.sip_udp, &[0xffu8; 65_000]), None);
    assert_eq!(
        udp_exchange(
            &sock,
            gw.sip_udp,
            b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP"
        ),
        None
    );

    let missing =
        request("OPTIONS", "nocallid", "", "", "UDP").replace("Call-ID: nocallid\r\n", "");
    let resp = udp_exchange(&sock, gw.sip_udp, missing.as_bytes()).expect("a 400");
    assert!(
        resp.starts_with("SIP/2.0 400 Bad Request (missing mandatory header Call-ID)"),
        "{resp}"
    );

    let truncated = request("OPTIONS", "trunc", "", "", "UDP")
        .replace("Content-Length: 0", "Content-Length: 500");
    let resp = udp_exchange(&sock, gw.sip_udp, truncated.as_bytes()).expect("a 400");
    assert!(
        resp.starts_with("SIP/2.0 400 Bad Request (the body is shorter"),
        "{resp}"
    );

    let bad_cseq =
        request("OPTIONS", "cseq", "", "", "UDP").replace("CSeq: 1 OPTIONS", "CSeq: one OPTIONS");
    let resp = udp_exchange(&sock, gw.sip_udp, bad_cseq.as_bytes()).expect("a 400");
    assert!(
        resp.starts_with("SIP/2.0 400 Bad Request (malformed CSeq header)"),
        "{resp}"
    );

    let bad_via =
        request("OPTIONS", "via", "", "", "UDP").replace("SIP/2.0/UDP 127.0.0.1:9", "nonsense");
    let resp = udp_exchange(&sock, gw.sip_udp, bad_via.as_bytes()).expect("a 400");
    assert!(resp.starts_with("SIP/2.0 400"), "{resp}");

    // An oversized datagram that is otherwise valid is answered normally (bounded by the datagram).
    let big = request("OPTIONS", "big", "", &"x".repeat(60_000), "UDP");
    let resp = udp_exchange(&sock, gw.sip_udp, big.as_bytes()).expect("an answer");
    assert!(resp.starts_with("SIP/2.0 200 OK"), "{resp}");

    // A REGISTER without credentials is challenged, never crashes on odd Contacts.
    let reg = request("REGISTER", "reg", "Contact: <<<>>>;;;\r\n", "", "UDP");
    let resp = udp_exchange(&sock, gw.sip_udp, reg.as_bytes()).expect("an answer");
    assert!(resp.starts_with("SIP/2.0 401"), "{resp}");

    let unknown = request("FROB", "frob", "", "", "UDP");
    let resp = udp_exchange(&sock, gw.sip_udp, unknown.as_bytes()).expect("an answer");
    assert!(resp.starts_with("SIP/2.0 501 Not Implemented"), "{resp}");
    let require = request("OPTIONS", "req", "Require: 100rel\r\n", "", "UDP");
    let resp = udp_exchange(&sock, gw.sip_udp, require.as_bytes()).expect("an answer");
    assert!(
        resp.starts_with("SIP/2.0 420 Bad Extension") && resp.contains("Unsupported: 100rel"),
        "{resp}"
    );
    let long_branch = request("OPTIONS", &"b".repeat(300), "", "", "UDP");
    let resp = udp_exchange(&sock, gw.sip_udp, long_branch.as_bytes()).expect("an answer");
    assert!(resp.starts_with("SIP/2.0 400"), "{resp}");

    let good = request("OPTIONS", "good", "", "", "UDP");
    let resp = udp_exchange(&sock, gw.sip_udp, good.as_bytes()).expect("still answering");
    assert!(resp.starts_with("SIP/2.0 200 OK"), "{resp}");
    assert!(gw.metric("smsgw_sip_malformed_total") >= 5.0);
}

fn tcp_send(gw: std::net::SocketAddr, data: &[u8]) -> String {
    let mut s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(data);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out); // the gateway closes a stream it cannot frame
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn tcp_streams_that_cannot_be_framed_are_answered_and_closed() {
    let gw = Gateway::start("bad-tcp", "max_message_bytes = 4096");
    assert_eq!(tcp_send(gw.sip_tcp, b"\x00\x01\x02 garbage\r\n\r\n"), "");

    let no_length = request("OPTIONS", "nolen", "", "", "TCP").replace("Content-Length: 0\r\n", "");
    let resp = tcp_send(gw.sip_tcp, no_length.as_bytes());
    assert!(
        resp.starts_with("SIP/2.0 400 Bad Request (missing mandatory header Content-Length)"),
        "{resp}"
    );

    let too_big = request("OPTIONS", "huge", "", "", "TCP")
        .replace("Content-Length: 0", "Content-Length: 999999999");
    let resp = tcp_send(gw.sip_tcp, too_big.as_bytes());
    assert!(resp.starts_with("SIP/2.0 400"), "{resp}");

    // A header section that never ends is cut off at the limit instead of buffered forever.
    let endless = format!("OPTIONS sip:x SIP/2.0\r\nX-Pad: {}", "a".repeat(64 * 1024));
    assert_eq!(tcp_send(gw.sip_tcp, endless.as_bytes()), "");

    // Keep-alive ping gets a pong, and pipelined requests on one connection are all answered.
    let mut s = TcpStream::connect(gw.sip_tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let two = format!(
        "\r\n\r\n{}{}",
        request("OPTIONS", "p1", "", "", "TCP"),
        request("OPTIONS", "p2", "", "", "TCP")
    );
    s.write_all(two.as_bytes()).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.matches("SIP/2.0 200 OK").count() < 2 {
        let n = s.read(&mut buf).expect("answers on the same connection");
        assert!(n > 0, "closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("\r\nSIP/2.0 200 OK"), "{got:?}");

    let out = sipsak_options(gw.sip_tcp, "tcp");
    assert!(out.status.success(), "{}", text(&out));
}
