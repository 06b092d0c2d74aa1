//! What a phone's MESSAGE body means (RFC 3428 content types, RFC 3862 CPIM, multipart images),
//! and the bodies smsgw sends to phones (IMDN, RFC 5438). Pure: no I/O.

use bytes::Bytes;

/// What to do with a MESSAGE body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Typing notices and delivery reports: answered 200, never sent as SMS.
    Ignore,
    Text(Outgoing),
}

/// The SMS a phone asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outgoing {
    pub text: String,
    pub media: Vec<Media>,
    /// The phone asked for delivery notifications (CPIM with IMDN headers).
    pub imdn: Option<ImdnRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    pub content_type: String,
    pub data: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdnRequest {
    pub message_id: String,
    /// The CPIM From of the phone's message: where notifications go.
    pub from: String,
    pub positive: bool,
    pub negative: bool,
}

/// A refusal with the SIP status that says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

pub const ACCEPT: &str = "text/plain, message/cpim, image/jpeg, image/png, image/gif, multipart/mixed, application/im-iscomposing+xml, message/imdn+xml";
const IMAGE_TYPES: [&str; 3] = ["image/jpeg", "image/png", "image/gif"];

/// `type/subtype` in lower case and the parameters, from a Content-Type value.
fn media_type(value: &str) -> (String, Vec<(String, String)>) {
    let mut parts = value.split(';');
    let main = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let params = parts
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_string(),
            ))
        })
        .collect();
    (main, params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Text in UTF-8 (the default) or ISO-8859-1 / US-ASCII; other charsets are refused.
fn decode_text(body: &[u8], charset: Option<&str>) -> Result<String, Refusal> {
    match charset.map(str::to_ascii_lowercase).as_deref() {
        None | Some("utf-8") | Some("utf8") => {
            String::from_utf8(body.to_vec()).map_err(|_| refuse(400, "the text is not valid UTF-8"))
        }
        Some("us-ascii") if body.is_ascii() => Ok(String::from_utf8_lossy(body).into_owned()),
        Some("iso-8859-1") | Some("latin1") => Ok(body.iter().map(|&b| b as char).collect()),
        Some(other) => Err(refuse(
            415,
            format!("charset {other} is not supported; use UTF-8"),
        )),
    }
}

pub fn parse(
    content_type: Option<&str>,
    body: &[u8],
    max_media_bytes: usize,
) -> Result<Content, Refusal> {
    parse_at(content_type, body, max_media_bytes, 0)
}

/// `depth` counts CPIM wrappers: one is allowed, a CPIM inside a CPIM is refused (a crafted body
/// must not be able to recurse without end).
fn parse_at(
    content_type: Option<&str>,
    body: &[u8],
    max_media_bytes: usize,
    depth: u8,
) -> Result<Content, Refusal> {
    let (kind, params) = media_type(content_type.unwrap_or("text/plain"));
    match kind.as_str() {
        "application/im-iscomposing+xml" | "message/imdn+xml" => Ok(Content::Ignore),
        _ if body.is_empty() => Err(refuse(400, "the message is empty")),
        "text/plain" => {
            let text = decode_text(body, param(&params, "charset"))?;
            if text.trim().is_empty() {
                return Err(refuse(400, "the message is empty"));
            }
            Ok(Content::Text(Outgoing {
                text,
                ..Outgoing::default()
            }))
        }
        "message/cpim" if depth > 0 => Err(refuse(
            415,
            "message/cpim inside message/cpim is not supported",
        )),
        "message/cpim" => parse_cpim(body, max_media_bytes),
        t if IMAGE_TYPES.contains(&t) => {
            if body.len() > max_media_bytes {
                return Err(refuse(
                    413,
                    format!("the image is larger than {max_media_bytes} bytes"),
                ));
            }
            Ok(Content::Text(Outgoing {
                media: vec![Media {
                    content_type: t.to_string(),
                    data: Bytes::copy_from_slice(body),
                }],
                ..Outgoing::default()
            }))
        }
        "multipart/mixed" | "multipart/related" => {
            let boundary = param(&params, "boundary")
                .ok_or_else(|| refuse(400, "multipart body without a boundary"))?;
            parse_multipart(body, boundary, max_media_bytes)
        }
        other => Err(refuse(415, format!("{other} is not supported"))),
    }
}

/// Splits a MIME entity into its header block and body.
fn split_entity(data: &[u8]) -> (String, &[u8]) {
    let (head, body) = match memmem(data, b"\r\n\r\n") {
        Some(i) => (&data[..i], &data[i + 4..]),
        None => match memmem(data, b"\n\n") {
            Some(i) => (&data[..i], &data[i + 2..]),
            None => (data, &data[data.len()..]),
        },
    };
    (String::from_utf8_lossy(head).into_owned(), body)
}

fn memmem(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// RFC 3862: CPIM headers, a blank line, then a MIME entity (headers, blank line, content).
fn parse_cpim(body: &[u8], max_media_bytes: usize) -> Result<Content, Refusal> {
    let (cpim_head, entity) = split_entity(body);
    let (mime_head, content) = split_entity(entity);
    let prefix = cpim_head.lines().find_map(|l| {
        let v = l.strip_prefix("NS:")?.trim();
        v.contains("urn:ietf:params:imdn")
            .then(|| v.split_whitespace().next().unwrap_or("imdn").to_string())
    });
    let inner = parse_at(
        header(&mime_head, "Content-Type"),
        content,
        max_media_bytes,
        1,
    )?;
    let Content::Text(mut out) = inner else {
        return Ok(Content::Ignore);
    };
    if let Some(ns) = prefix {
        let get = |n: &str| header(&cpim_head, &format!("{ns}.{n}"));
        if let (Some(id), Some(disposition)) = (get("Message-ID"), get("Disposition-Notification"))
        {
            let from = header(&cpim_head, "From").unwrap_or_default();
            let from = from
                .split_once('<')
                .and_then(|(_, r)| r.split_once('>'))
                .map_or(from, |(u, _)| u)
                .to_string();
            out.imdn = Some(ImdnRequest {
                message_id: id.to_string(),
                from,
                positive: disposition.contains("positive-delivery"),
                negative: disposition.contains("negative-delivery"),
            });
        }
    }
    Ok(Content::Text(out))
}

fn parse_multipart(
    body: &[u8],
    boundary: &str,
    max_media_bytes: usize,
) -> Result<Content, Refusal> {
    let delimiter = format!("--{boundary}");
    let text = body;
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = memmem(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let end = memmem(rest, delimiter.as_bytes()).unwrap_or(rest.len());
        let part = rest[..end].strip_prefix(b"\r\n").unwrap_or(&rest[..end]);
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        parts.push(part);
    }
    let mut out = Outgoing::default();
    for part in parts {
        let (head, content) = split_entity(part);
        let (kind, params) = media_type(header(&head, "Content-Type").unwrap_or("text/plain"));
        if kind == "text/plain" {
            let t = decode_text(content, param(&params, "charset"))?;
            if !out.text.is_empty() && !t.is_empty() {
                out.text.push('\n');
            }
            out.text.push_str(&t);
        } else if IMAGE_TYPES.contains(&kind.as_str()) {
            if content.len() > max_media_bytes {
                return Err(refuse(
                    413,
                    format!("an image is larger than {max_media_bytes} bytes"),
                ));
            }
            out.media.push(Media {
                content_type: kind,
                data: Bytes::copy_from_slice(content),
            });
        }
    }
    if out.media.len() > 10 {
        return Err(refuse(413, "more than 10 images in one message"));
    }
    if out.text.trim().is_empty() && out.media.is_empty() {
        return Err(refuse(
            415,
            "the multipart body has no text/plain or image part",
        ));
    }
    Ok(Content::Text(out))
}

/// An IMDN delivery notification (RFC 5438 §7.2.1.1) wrapped in CPIM, for the phone.
pub fn imdn_body(
    request: &ImdnRequest,
    gateway_uri: &str,
    delivered: bool,
    now_rfc3339: &str,
    id: &str,
) -> String {
    let status = if delivered {
        "<delivered/>"
    } else {
        "<failed/>"
    };
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n<imdn xmlns=\"urn:ietf:params:xml:ns:imdn\"><message-id>{}</message-id><datetime>{now_rfc3339}</datetime><delivery-notification><status>{status}</status></delivery-notification></imdn>",
        xml_escape(&request.message_id)
    );
    format!(
        "From: <{gateway_uri}>\r\nTo: <{}>\r\nNS: imdn <urn:ietf:params:imdn>\r\nimdn.Message-ID: {id}\r\nDateTime: {now_rfc3339}\r\n\r\nContent-Type: message/imdn+xml\r\nContent-Disposition: notification\r\nContent-Length: {}\r\n\r\n{xml}",
        request.from,
        xml.len()
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        type Case<'a> = (Option<&'a str>, &'a [u8], Result<&'a str, u16>);
        let cases: Vec<Case> = vec![
            (
                Some("text/plain;charset=UTF-8"),
                "héllo".as_bytes(),
                Ok("héllo"),
            ),
            (None, b"plain", Ok("plain")),
            (
                Some("text/plain; charset=ISO-8859-1"),
                b"caf\xe9",
                Ok("café"),
            ),
            (Some("text/plain;charset=shift_jis"), b"x", Err(415)),
            (Some("text/plain"), b"\xff\xfe", Err(400)),
            (Some("text/plain"), b"", Err(400)),
            (Some("text/plain"), b"  ", Err(400)),
            (
                Some("application/vnd.gsma.rcs-ft-http+xml"),
                b"<x/>",
                Err(415),
            ),
        ];
        for (ct, body, want) in cases {
            let got = parse(ct, body, 1000);
            match (want, got) {
                (Ok(text), Ok(Content::Text(o))) => assert_eq!(o.text, text),
                (Err(code), Err(r)) => assert_eq!(r.status, code, "{ct:?}"),
                (want, got) => panic!("{ct:?}: want {want:?}, got {got:?}"),
            }
        }
        assert_eq!(
            parse(
                Some("application/im-iscomposing+xml"),
                b"<isComposing/>",
                10
            ),
            Ok(Content::Ignore)
        );
        assert_eq!(
            parse(Some("message/imdn+xml"), b"<imdn/>", 10),
            Ok(Content::Ignore)
        );
    }

    #[test]
    fn images_and_multipart() {
        let Ok(Content::Text(o)) = parse(Some("image/png"), b"\x89PNG....", 100) else {
            panic!()
        };
        assert_eq!(o.media.len(), 1);
        assert_eq!(
            parse(Some("image/png"), &[0u8; 101], 100)
                .unwrap_err()
                .status,
            413
        );
        let body = b"--b1\r\nContent-Type: text/plain\r\n\r\nlook at this\r\n--b1\r\nContent-Type: image/jpeg\r\n\r\nJPEGDATA\r\n--b1--\r\n";
        let Ok(Content::Text(o)) = parse(Some("multipart/mixed; boundary=\"b1\""), body, 100)
        else {
            panic!()
        };
        assert_eq!(o.text, "look at this");
        assert_eq!(o.media[0].content_type, "image/jpeg");
        assert_eq!(&o.media[0].data[..], b"JPEGDATA");
    }

    #[test]
    fn cpim_with_imdn_request() {
        let body = "From: <sip:101@pbx>\r\nTo: <sip:+15551234567@pbx>\r\nNS: imdn <urn:ietf:params:imdn>\r\nimdn.Message-ID: 34jk324j\r\nDateTime: 2024-01-01T00:00:00Z\r\nimdn.Disposition-Notification: positive-delivery, negative-delivery\r\n\r\nContent-Type: text/plain;charset=utf-8\r\n\r\nHello via CPIM";
        let Ok(Content::Text(o)) = parse(Some("message/cpim"), body.as_bytes(), 100) else {
            panic!()
        };
        assert_eq!(o.text, "Hello via CPIM");
        let imdn = o.imdn.unwrap();
        assert_eq!(imdn.message_id, "34jk324j");
        assert_eq!(imdn.from, "sip:101@pbx");
        assert!(imdn.positive && imdn.negative);
        let note = imdn_body(&imdn, "sip:smsgw@pbx", false, "2024-01-01T00:00:01Z", "n1");
        assert!(note.contains("<failed/>") && note.contains("To: <sip:101@pbx>"));
        assert!(note.contains("<message-id>34jk324j</message-id>"));
        let composing = "From: <sip:a@b>\r\n\r\nContent-Type: application/im-iscomposing+xml\r\n\r\n<isComposing/>";
        assert_eq!(
            parse(Some("message/cpim"), composing.as_bytes(), 100),
            Ok(Content::Ignore)
        );
    }
}
