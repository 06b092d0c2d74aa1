//! SIP for smsgw: parsing, transports, non-INVITE transactions, the registrar and the digest server.
//!
//! Layout:
//! - [`message`], [`uri`]: parsing and printing, no I/O.
//! - [`transport`]: flows and stream framing, no I/O.
//! - [`endpoint`]: UDP/TCP listeners, connection table, server and client transactions.
//! - [`digest`]: challenges, self-validating nonces, verification with replay protection.
//! - [`registrar`]: bindings (location service), with expiry; persistence is the caller's.
//! - [`guard`]: the brute-force guard.
//!
//! This crate knows nothing of Twilio or of the gateway's store.
#![forbid(unsafe_code)]

pub mod digest;
pub mod endpoint;
pub mod guard;
pub mod message;
pub mod registrar;
pub mod transport;
pub mod uri;

pub use endpoint::{Endpoint, EndpointConfig, Handler, ServerTx, SipError};
pub use message::{Headers, Method, Request, Response};
pub use transport::{ConnId, Flow, Transport};

/// A random token of `len` lowercase hex-ish characters (tags, branches, Call-IDs).
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}
