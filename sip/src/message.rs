//! SIP message parsing and printing (RFC 3261 §7, §20). No I/O.
//!
//! Headers are kept as (name, value) text in arrival order; compact names are expanded so lookups
//! need only the long form. Typed views (Via, CSeq, name-addr) are parsed on demand.

use bytes::Bytes;
use std::fmt::Write as _;

/// Upper bound on the header section, so a peer cannot make us buffer without end.
pub const MAX_HEAD_LEN: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the message is not UTF-8 in its start line or headers")]
    NotUtf8,
    #[error("the message has no end of headers (no empty line)")]
    Incomplete,
    #[error("the header section is longer than {MAX_HEAD_LEN} bytes")]
    HeadTooLong,
    #[error("malformed start line {0:?}")]
    StartLine(String),
    #[error("malformed header line {0:?}")]
    HeaderLine(String),
    #[error("Content-Length {0:?} is not a number")]
    ContentLength(String),
    #[error("the body is shorter than Content-Length says ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("missing mandatory header {0}")]
    MissingHeader(&'static str),
    #[error("malformed {0} header")]
    BadHeader(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Register,
    Options,
    Message,
    Invite,
    Ack,
    Bye,
    Cancel,
    Other(Box<str>),
}

impl Method {
    pub fn parse(s: &str) -> Self {
        match s {
            "REGISTER" => Self::Register,
            "OPTIONS" => Self::Options,
            "MESSAGE" => Self::Message,
            "INVITE" => Self::Invite,
            "ACK" => Self::Ack,
            "BYE" => Self::Bye,
            "CANCEL" => Self::Cancel,
            other => Self::Other(other.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Register => "REGISTER",
            Self::Options => "OPTIONS",
            Self::Message => "MESSAGE",
            Self::Invite => "INVITE",
            Self::Ack => "ACK",
            Self::Bye => "BYE",
            Self::Cancel => "CANCEL",
            Self::Other(s) => s,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Header fields in arrival order. Lookups ignore case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

fn expand_compact(name: &str) -> &str {
    if name.len() != 1 {
        return name;
    }
    match name.as_bytes()[0].to_ascii_lowercase() {
        b'v' => "Via",
        b'f' => "From",
        b't' => "To",
        b'i' => "Call-ID",
        b'm' => "Contact",
        b'l' => "Content-Length",
        b'c' => "Content-Type",
        b'k' => "Supported",
        b'e' => "Content-Encoding",
        b's' => "Subject",
        b'o' => "Event",
        b'u' => "Allow-Events",
        _ => name,
    }
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every comma-separated element of every line of `name` (for Via, Contact and similar lists).
    pub fn list<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.get_all(name).flat_map(split_list)
    }

    /// Puts a header line before all others (a new top Via).
    pub fn prepend(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(0, (name.into(), value.into()));
    }

    /// Replaces the first element of the first `name` line, keeping any further elements.
    pub fn replace_first_list_item(&mut self, name: &str, item: &str) {
        if let Some(value) = self.first_mut(name) {
            let rest: Vec<&str> = split_list(value).skip(1).collect();
            let mut new = item.to_string();
            for r in rest {
                new.push_str(", ");
                new.push_str(r);
            }
            *value = new;
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn first_mut(&mut self, name: &str) -> Option<&mut String> {
        self.0
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Splits a header value at commas that are outside quotes and angle brackets.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut quoted, mut angle, mut escaped, mut start) = (false, false, false, 0);
    for (i, b) in value.bytes().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'<' if !quoted => angle = true,
            b'>' if !quoted => angle = false,
            b',' if !quoted && !angle => {
                parts.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(value[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    pub uri: String,
    pub headers: Headers,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub reason: String,
    pub headers: Headers,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request(Request),
    Response(Response),
}

/// Where the header section ends: the index of the first body byte, if the empty line is there.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The start line and headers of a message, before its body is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub start: StartLine,
    pub headers: Headers,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: Method, uri: String },
    Response { code: u16, reason: String },
}

impl Head {
    /// Parses `buf[..end]` where `end` came from [`head_end`].
    pub fn parse(head: &[u8]) -> Result<Self, ParseError> {
        if head.len() > MAX_HEAD_LEN {
            return Err(ParseError::HeadTooLong);
        }
        let text = std::str::from_utf8(head).map_err(|_| ParseError::NotUtf8)?;
        let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let first = lines.next().unwrap_or_default();
        let start = parse_start_line(first)?;
        let mut headers = Headers(Vec::with_capacity(12));
        for line in lines {
            if line.is_empty() {
                break;
            }
            if line.starts_with([' ', '\t']) {
                // Folded continuation of the previous header (RFC 3261 §7.3.1).
                let Some((_, last)) = headers.0.last_mut() else {
                    return Err(ParseError::HeaderLine(line.to_string()));
                };
                last.push(' ');
                last.push_str(line.trim());
                continue;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| ParseError::HeaderLine(truncate(line)))?;
            let name = name.trim_end();
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                return Err(ParseError::HeaderLine(truncate(line)));
            }
            headers.push(expand_compact(name), value.trim());
        }
        Ok(Self { start, headers })
    }

    pub fn content_length(&self) -> Result<Option<usize>, ParseError> {
        self.headers
            .get("Content-Length")
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| ParseError::ContentLength(truncate(v)))
            })
            .transpose()
    }

    pub fn into_message(self, body: Bytes) -> Message {
        match self.start {
            StartLine::Request { method, uri } => Message::Request(Request {
                method,
                uri,
                headers: self.headers,
                body,
            }),
            StartLine::Response { code, reason } => Message::Response(Response {
                code,
                reason,
                headers: self.headers,
                body,
            }),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

fn parse_start_line(line: &str) -> Result<StartLine, ParseError> {
    let bad = || ParseError::StartLine(truncate(line));
    if let Some(rest) = line.strip_prefix("SIP/2.0 ") {
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let code: u16 = code.parse().map_err(|_| bad())?;
        if !(100..700).contains(&code) {
            return Err(bad());
        }
        return Ok(StartLine::Response {
            code,
            reason: reason.to_string(),
        });
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some("SIP/2.0"), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) || uri.is_empty() {
        return Err(bad());
    }
    Ok(StartLine::Request {
        method: Method::parse(method),
        uri: uri.to_string(),
    })
}

/// Parses one whole datagram. Bytes after Content-Length are ignored (RFC 3261 §18.3).
pub fn parse_datagram(buf: &[u8]) -> Result<Message, ParseError> {
    let end = head_end(buf).ok_or(ParseError::Incomplete)?;
    let head = Head::parse(&buf[..end])?;
    let available = buf.len() - end;
    let len = head.content_length()?.unwrap_or(available);
    if len > available {
        return Err(ParseError::Truncated {
            got: available,
            want: len,
        });
    }
    Ok(head.into_message(Bytes::copy_from_slice(&buf[end..end + len])))
}

/// The reason phrase RFC 3261 §21 gives a status code.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        _ => "Unknown",
    }
}

fn write_headers_and_body(out: &mut String, headers: &Headers, body: &[u8]) -> Vec<u8> {
    for (name, value) in headers.iter() {
        if name.eq_ignore_ascii_case("Content-Length") {
            continue;
        }
        let _ = write!(out, "{name}: {value}\r\n");
    }
    let _ = write!(out, "Content-Length: {}\r\n\r\n", body.len());
    let mut bytes = std::mem::take(out).into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

impl Request {
    pub fn to_bytes(&self) -> Bytes {
        let mut out = String::with_capacity(512);
        let _ = write!(out, "{} {} SIP/2.0\r\n", self.method, self.uri);
        write_headers_and_body(&mut out, &self.headers, &self.body).into()
    }

    /// RFC 3261 §8.2: the headers every request must carry, checked before a transaction exists.
    pub fn check_mandatory(&self) -> Result<(), ParseError> {
        for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
            if self.headers.get(name).is_none_or(str::is_empty) {
                return Err(ParseError::MissingHeader(name));
            }
        }
        let (_, method) = self.cseq()?;
        if method != self.method {
            return Err(ParseError::BadHeader("CSeq"));
        }
        Ok(())
    }

    pub fn cseq(&self) -> Result<(u32, Method), ParseError> {
        let value = self
            .headers
            .get("CSeq")
            .ok_or(ParseError::MissingHeader("CSeq"))?;
        let (num, method) = value
            .trim()
            .split_once(char::is_whitespace)
            .ok_or(ParseError::BadHeader("CSeq"))?;
        let num = num.parse().map_err(|_| ParseError::BadHeader("CSeq"))?;
        Ok((num, Method::parse(method.trim())))
    }

    pub fn call_id(&self) -> &str {
        self.headers.get("Call-ID").unwrap_or_default()
    }

    /// The topmost Via element.
    pub fn top_via(&self) -> Result<crate::uri::Via, ParseError> {
        let top = self
            .headers
            .list("Via")
            .next()
            .ok_or(ParseError::MissingHeader("Via"))?;
        crate::uri::Via::parse(top).ok_or(ParseError::BadHeader("Via"))
    }
}

impl Response {
    /// A response to `req` with the headers RFC 3261 §8.2.6.2 copies, and a To tag on non-100s.
    pub fn to(req: &Request, code: u16) -> Self {
        Self::with_reason(req, code, reason_phrase(code))
    }

    pub fn with_reason(req: &Request, code: u16, reason: &str) -> Self {
        let mut headers = Headers(Vec::with_capacity(10));
        for (name, value) in req.headers.iter() {
            if ["Via", "From", "Call-ID", "CSeq"]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
            {
                headers.push(name, value);
            } else if name.eq_ignore_ascii_case("To") {
                let has_tag =
                    crate::uri::NameAddr::parse(value).is_some_and(|na| na.param("tag").is_some());
                if has_tag || code == 100 {
                    headers.push("To", value);
                } else {
                    headers.push("To", format!("{value};tag={}", crate::random_token(8)));
                }
            }
        }
        Self {
            code,
            reason: reason.to_string(),
            headers,
            body: Bytes::new(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push(name, value);
        self
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = String::with_capacity(512);
        let _ = write!(out, "SIP/2.0 {} {}\r\n", self.code, self.reason);
        write_headers_and_body(&mut out, &self.headers, &self.body).into()
    }

    pub fn cseq_method(&self) -> Option<Method> {
        let value = self.headers.get("CSeq")?;
        Some(Method::parse(value.split_whitespace().nth(1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REGISTER: &str = "REGISTER sip:pbx.example.com SIP/2.0\r\n\
        Via: SIP/2.0/UDP 192.0.2.4:5060;branch=z9hG4bKnashds7;rport\r\n\
        Max-Forwards: 70\r\n\
        To: Bob <sip:101@pbx.example.com>\r\n\
        From: Bob <sip:101@pbx.example.com>;tag=456248\r\n\
        Call-ID: 843817637684230@998sdasdh09\r\n\
        CSeq: 1826 REGISTER\r\n\
        Contact: <sip:101@192.0.2.4>\r\n\
        Expires: 7200\r\n\
        Content-Length: 0\r\n\r\n";

    fn parse_request(text: &str) -> Request {
        match parse_datagram(text.as_bytes()).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => panic!("expected a request"),
        }
    }

    #[test]
    fn register_round_trip() {
        let req = parse_request(REGISTER);
        assert_eq!(req.method, Method::Register);
        assert_eq!(req.uri, "sip:pbx.example.com");
        assert_eq!(req.cseq().unwrap(), (1826, Method::Register));
        assert_eq!(req.call_id(), "843817637684230@998sdasdh09");
        req.check_mandatory().unwrap();
        let again = parse_request(std::str::from_utf8(&req.to_bytes()).unwrap());
        assert_eq!(again, req);
    }

    #[test]
    fn message_with_body_and_compact_headers() {
        let text = "MESSAGE sip:+15551234567@pbx SIP/2.0\r\n\
            v: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bK1\r\n\
            f: <sip:101@pbx>;tag=a\r\nt: <sip:+15551234567@pbx>\r\ni: abc\r\n\
            CSeq: 2 MESSAGE\r\nc: text/plain;charset=UTF-8\r\nl: 5\r\n\r\nhello";
        let req = parse_request(text);
        assert_eq!(
            req.headers.get("content-type"),
            Some("text/plain;charset=UTF-8")
        );
        assert_eq!(&req.body[..], b"hello");
        req.check_mandatory().unwrap();
        let round = parse_request(std::str::from_utf8(&req.to_bytes()).unwrap());
        assert_eq!(round.body, req.body);
    }

    #[test]
    fn options_round_trip_and_response() {
        let text = REGISTER.replace("REGISTER", "OPTIONS");
        let req = parse_request(&text);
        let resp = Response::to(&req, 200).header("Allow", "REGISTER, OPTIONS");
        let parsed = match parse_datagram(&resp.to_bytes()).unwrap() {
            Message::Response(r) => r,
            Message::Request(_) => panic!("expected a response"),
        };
        assert_eq!(parsed.code, 200);
        assert_eq!(parsed.reason, "OK");
        assert_eq!(parsed.cseq_method(), Some(Method::Options));
        assert!(parsed.headers.get("To").unwrap().contains(";tag="));
        assert_eq!(parsed.headers.get("Via"), req.headers.get("Via"));
    }

    #[test]
    fn folded_headers_and_lf_only() {
        let text =
            "OPTIONS sip:a SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\nSubject: one\n two\n\n";
        let req = parse_request(text);
        assert_eq!(req.headers.get("Subject"), Some("one two"));
    }

    #[test]
    fn errors_are_specific() {
        assert_eq!(parse_datagram(b"garbage"), Err(ParseError::Incomplete));
        assert!(matches!(
            parse_datagram(b"HELLO\r\n\r\n"),
            Err(ParseError::StartLine(_))
        ));
        let truncated = REGISTER.replace("Content-Length: 0", "Content-Length: 50");
        assert_eq!(
            parse_datagram(truncated.as_bytes()),
            Err(ParseError::Truncated { got: 0, want: 50 })
        );
        let no_callid = REGISTER.replace("Call-ID: 843817637684230@998sdasdh09\r\n", "");
        assert_eq!(
            parse_request(&no_callid).check_mandatory(),
            Err(ParseError::MissingHeader("Call-ID"))
        );
        let bad_cseq = REGISTER.replace("1826 REGISTER", "1826 INVITE");
        assert_eq!(
            parse_request(&bad_cseq).check_mandatory(),
            Err(ParseError::BadHeader("CSeq"))
        );
    }

    #[test]
    fn list_splitting_respects_quotes_and_brackets() {
        let items: Vec<_> =
            split_list(r#""Doe, J" <sip:a@b;x=1,2>;q=0.5, <sip:c@d>, sip:e@f"#).collect();
        assert_eq!(
            items,
            vec![r#""Doe, J" <sip:a@b;x=1,2>;q=0.5"#, "<sip:c@d>", "sip:e@f"]
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_datagram(&data);
        }

        #[test]
        fn parser_never_panics_on_mutated_register(pos in 0usize..400, byte in any::<u8>()) {
            let mut data = REGISTER.as_bytes().to_vec();
            let i = pos % data.len();
            data[i] = byte;
            if let Ok(Message::Request(r)) = parse_datagram(&data) {
                let _ = r.check_mandatory();
                let _ = r.top_via();
            }
        }

        #[test]
        fn headers_round_trip(value in "[a-zA-Z0-9;=<>@:. -]{0,60}") {
            let text = format!("OPTIONS sip:a SIP/2.0\r\nX-Test: {value}\r\n\r\n");
            let req = parse_request(&text);
            let again = parse_request(std::str::from_utf8(&req.to_bytes()).unwrap());
            prop_assert_eq!(again.headers.get("X-Test"), Some(value.trim()));
        }
    }
}
