//! Flows (where a message came from and how to answer it) and stream framing (RFC 3261 §18.3).

use crate::message::{head_end, Head, Message, ParseError, MAX_HEAD_LEN};
use bytes::{Buf, Bytes, BytesMut};
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }

    pub fn via_name(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "udp" => Some(Self::Udp),
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }

    pub fn is_reliable(self) -> bool {
        matches!(self, Self::Tcp)
    }
}

/// Identifies one accepted or opened stream connection for the life of the process.
pub type ConnId = u64;

/// A transport flow (RFC 5626): the transport, our local address, the peer's source address, and
/// for streams the connection. Requests to a registered phone go back over the flow it registered
/// on, which is what gets them through NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub conn: Option<ConnId>,
}

/// What the stream decoder found next in a connection's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A CRLF CRLF keep-alive ping (RFC 5626 §4.4.1), to be answered with CRLF.
    Ping,
    Message(Message),
}

/// Splits a byte stream into SIP messages using Content-Length, which streams must carry.
#[derive(Debug)]
pub struct StreamDecoder {
    pub buf: BytesMut,
    max_body: usize,
}

impl StreamDecoder {
    pub fn new(max_body: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(4096),
            max_body,
        }
    }

    /// The next frame, `Ok(None)` if more bytes are needed. An error means the stream can no
    /// longer be framed and the connection must be closed (after answering, if possible).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, (Option<Head>, ParseError)> {
        let leading = self
            .buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if leading > 0 {
            let ping = self.buf.starts_with(b"\r\n\r\n");
            self.buf.advance(if ping { 4 } else { leading });
            if ping {
                return Ok(Some(Frame::Ping));
            }
        }
        let Some(end) = head_end(&self.buf) else {
            if self.buf.len() > MAX_HEAD_LEN {
                return Err((None, ParseError::HeadTooLong));
            }
            return Ok(None);
        };
        let head = Head::parse(&self.buf[..end]).map_err(|e| (None, e))?;
        let len = match head.content_length() {
            Ok(Some(len)) if len <= self.max_body => len,
            Ok(Some(_)) => return Err((Some(head), ParseError::ContentLength("too large".into()))),
            Ok(None) => return Err((Some(head), ParseError::MissingHeader("Content-Length"))),
            Err(e) => return Err((Some(head), e)),
        };
        if self.buf.len() < end + len {
            // Nothing is reserved ahead: a peer announcing a large body must actually send it.
            return Ok(None);
        }
        self.buf.advance(end);
        let body: Bytes = self.buf.split_to(len).freeze();
        Ok(Some(Frame::Message(head.into_message(body))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OPTIONS: &[u8] = b"OPTIONS sip:a SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nContent-Length: 3\r\n\r\nabc";

    #[test]
    fn frames_pipelined_and_split_messages() {
        let mut d = StreamDecoder::new(1024);
        d.buf.extend_from_slice(b"\r\n\r\n");
        d.buf.extend_from_slice(OPTIONS);
        d.buf.extend_from_slice(&OPTIONS[..20]);
        assert_eq!(d.next_frame().unwrap(), Some(Frame::Ping));
        let Some(Frame::Message(Message::Request(r))) = d.next_frame().unwrap() else {
            panic!("expected a request")
        };
        assert_eq!(&r.body[..], b"abc");
        assert_eq!(d.next_frame().unwrap(), None);
        d.buf.extend_from_slice(&OPTIONS[20..]);
        assert!(matches!(d.next_frame().unwrap(), Some(Frame::Message(_))));
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn refuses_missing_and_oversized_content_length() {
        let mut d = StreamDecoder::new(2);
        d.buf.extend_from_slice(OPTIONS);
        assert!(matches!(
            d.next_frame(),
            Err((Some(_), ParseError::ContentLength(_)))
        ));
        let mut d = StreamDecoder::new(1024);
        d.buf
            .extend_from_slice(b"OPTIONS sip:a SIP/2.0\r\nVia: SIP/2.0/TCP h\r\n\r\n");
        assert!(matches!(
            d.next_frame(),
            Err((Some(_), ParseError::MissingHeader("Content-Length")))
        ));
        let mut d = StreamDecoder::new(1024);
        d.buf.extend_from_slice(&vec![b'a'; MAX_HEAD_LEN + 1]);
        assert!(matches!(
            d.next_frame(),
            Err((None, ParseError::HeadTooLong))
        ));
    }

    proptest! {
        #[test]
        fn any_split_point_gives_the_same_message(split in 0usize..OPTIONS.len()) {
            let mut d = StreamDecoder::new(1024);
            d.buf.extend_from_slice(&OPTIONS[..split]);
            let first = d.next_frame().unwrap();
            d.buf.extend_from_slice(&OPTIONS[split..]);
            let frame = match first { Some(f) => Some(f), None => d.next_frame().unwrap() };
            prop_assert!(matches!(frame, Some(Frame::Message(_))));
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = StreamDecoder::new(1024);
            d.buf.extend_from_slice(&data);
            for _ in 0..8 {
                match d.next_frame() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        }
    }
}
