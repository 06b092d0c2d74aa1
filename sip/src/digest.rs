//! The digest server (RFC 3261 §22, RFC 7616, RFC 8760): challenges, nonces and verification.
//!
//! Nonces are self-validating: `ts ‖ id ‖ HMAC-SHA256(key, ts ‖ id ‖ realm ‖ client IP)[..16]`, so
//! nothing is stored per challenge, and a nonce only works from the address it was sent to (a
//! spoofed source never sees its challenge, so it cannot even produce a wrong answer that counts). Only nonces that have been *used* are remembered (their last nc), which is
//! what replay protection needs; that table has a hard size bound.

use base64::Engine as _;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest as _, Sha256};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Md5 => "MD5",
            Self::Sha256 => "SHA-256",
        }
    }

    /// Case-insensitive; a missing `algorithm=` means MD5 (RFC 2617).
    pub fn parse(name: Option<&str>) -> Option<Self> {
        match name {
            None => Some(Self::Md5),
            Some(n) if n.eq_ignore_ascii_case("MD5") => Some(Self::Md5),
            Some(n) if n.eq_ignore_ascii_case("SHA-256") => Some(Self::Sha256),
            _ => None,
        }
    }

    pub fn hex(self, data: &[u8]) -> String {
        match self {
            Self::Md5 => hex(&Md5::digest(data)),
            Self::Sha256 => hex(&Sha256::digest(data)),
        }
    }

    /// HA1 = H(username:realm:password).
    pub fn ha1(self, user: &str, realm: &str, password: &str) -> String {
        self.hex(format!("{user}:{realm}:{password}").as_bytes())
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// The parameters of an `Authorization: Digest …` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DigestCredentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Option<String>,
    pub cnonce: Option<String>,
    pub qop: Option<String>,
    pub nc: Option<String>,
    pub opaque: Option<String>,
}

impl DigestCredentials {
    pub fn parse(header: &str) -> Option<Self> {
        let (scheme, rest) = header.trim().split_once(char::is_whitespace)?;
        if !scheme.eq_ignore_ascii_case("Digest") {
            return None;
        }
        let mut creds = Self::default();
        for (key, value) in auth_params(rest)? {
            let slot = match key.to_ascii_lowercase().as_str() {
                "username" => &mut creds.username,
                "realm" => &mut creds.realm,
                "nonce" => &mut creds.nonce,
                "uri" => &mut creds.uri,
                "response" => &mut creds.response,
                "algorithm" => creds.algorithm.insert(String::new()),
                "cnonce" => creds.cnonce.insert(String::new()),
                "qop" => creds.qop.insert(String::new()),
                "nc" => creds.nc.insert(String::new()),
                "opaque" => creds.opaque.insert(String::new()),
                _ => continue,
            };
            *slot = value;
        }
        (!creds.username.is_empty() && !creds.nonce.is_empty() && !creds.response.is_empty())
            .then_some(creds)
    }

    /// The expected `response=` for this header's parameters.
    pub fn expected_response(&self, algorithm: Algorithm, ha1: &str, method: &str) -> String {
        let ha2 = algorithm.hex(format!("{method}:{}", self.uri).as_bytes());
        match (&self.qop, &self.nc, &self.cnonce) {
            (Some(qop), Some(nc), Some(cnonce)) => {
                algorithm.hex(format!("{ha1}:{}:{nc}:{cnonce}:{qop}:{ha2}", self.nonce).as_bytes())
            }
            _ => algorithm.hex(format!("{ha1}:{}:{ha2}", self.nonce).as_bytes()),
        }
    }
}

/// `k=v, k="quoted, value"` pairs; `None` if quoting is broken.
fn auth_params(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        out.push((key.trim().to_string(), value));
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

/// What a nonce says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceState {
    Fresh { id: u64, issued: u64 },
    Expired,
    Forged,
}

/// The result of checking an Authorization header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// The hash was right but the nonce is too old: challenge again with `stale=true`.
    Stale,
    Rejected(RejectReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("the realm is not ours")]
    WrongRealm,
    #[error("the algorithm is not offered")]
    UnsupportedAlgorithm,
    #[error("qop=auth with nc and cnonce is required")]
    QopRequired,
    #[error("the nonce was not issued by us")]
    ForgedNonce,
    #[error("nc was not greater than the last one seen for this nonce (replay)")]
    Replay,
    #[error("too many nonces in use; challenged again")]
    NonceTableFull,
    #[error("wrong credentials")]
    WrongCredentials,
}

impl RejectReason {
    /// A short, stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::WrongRealm => "wrong_realm",
            Self::UnsupportedAlgorithm => "unsupported_algorithm",
            Self::QopRequired => "qop_required",
            Self::ForgedNonce => "forged_nonce",
            Self::Replay => "replay",
            Self::NonceTableFull => "nonce_table_full",
            Self::WrongCredentials => "wrong_credentials",
        }
    }
}

/// Settings of the digest server.
#[derive(Debug, Clone)]
pub struct DigestConfig {
    pub realm: String,
    /// In order of preference; the first is offered first (RFC 8760 §2.4).
    pub algorithms: Vec<Algorithm>,
    pub nonce_lifetime_secs: u64,
    /// Hard bound on remembered (used) nonces.
    pub max_tracked_nonces: usize,
}

pub struct DigestServer {
    config: DigestConfig,
    key: [u8; 32],
    /// nonce id → (last nc, issued at).
    used: DashMap<u64, (u32, u64)>,
    used_len: AtomicUsize,
}

type HmacSha256 = Hmac<Sha256>;

impl DigestServer {
    pub fn new(config: DigestConfig) -> Self {
        Self::with_key(config, rand::random())
    }

    pub fn with_key(config: DigestConfig, key: [u8; 32]) -> Self {
        Self {
            config,
            key,
            used: DashMap::new(),
            used_len: AtomicUsize::new(0),
        }
    }

    pub fn realm(&self) -> &str {
        &self.config.realm
    }

    fn mac(&self, ts: u64, id: u64, ip: IpAddr) -> [u8; 16] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("any key length");
        mac.update(&ts.to_be_bytes());
        mac.update(&id.to_be_bytes());
        mac.update(self.config.realm.as_bytes());
        match ip {
            IpAddr::V4(v4) => mac.update(&v4.octets()),
            IpAddr::V6(v6) => mac.update(&v6.octets()),
        }
        let full = mac.finalize().into_bytes();
        full[..16].try_into().expect("16 of 32 bytes")
    }

    pub fn new_nonce(&self, now: u64, ip: IpAddr) -> String {
        let id: u64 = rand::random();
        let mut raw = [0u8; 32];
        raw[..8].copy_from_slice(&now.to_be_bytes());
        raw[8..16].copy_from_slice(&id.to_be_bytes());
        raw[16..].copy_from_slice(&self.mac(now, id, ip));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn check_nonce(&self, nonce: &str, now: u64, ip: IpAddr) -> NonceState {
        let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(nonce) else {
            return NonceState::Forged;
        };
        if raw.len() != 32 {
            return NonceState::Forged;
        }
        let ts = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
        let id = u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes"));
        if !bool::from(self.mac(ts, id, ip).ct_eq(&raw[16..])) {
            return NonceState::Forged;
        }
        if ts > now.saturating_add(5) || now - ts.min(now) > self.config.nonce_lifetime_secs {
            return NonceState::Expired;
        }
        NonceState::Fresh { id, issued: ts }
    }

    /// One `WWW-Authenticate` value per offered algorithm, most preferred first.
    pub fn challenges(&self, now: u64, stale: bool, ip: IpAddr) -> Vec<String> {
        let nonce = self.new_nonce(now, ip);
        self.config
            .algorithms
            .iter()
            .map(|alg| {
                format!(
                    "Digest realm=\"{}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{}",
                    self.config.realm,
                    alg.name(),
                    if stale { ", stale=true" } else { "" }
                )
            })
            .collect()
    }

    /// Checks `creds` for a request with `method`. `ha1` gives the stored HA1 of the user for an
    /// algorithm, or `None` for an unknown user; an unknown user costs the same work and gets the
    /// same answer as a wrong password, so extensions cannot be enumerated.
    pub fn verify(
        &self,
        creds: &DigestCredentials,
        method: &str,
        ha1: Option<&str>,
        now: u64,
        ip: IpAddr,
    ) -> Verdict {
        use Verdict::Rejected;
        if creds.realm != self.config.realm {
            return Rejected(RejectReason::WrongRealm);
        }
        let Some(algorithm) = Algorithm::parse(creds.algorithm.as_deref())
            .filter(|a| self.config.algorithms.contains(a))
        else {
            return Rejected(RejectReason::UnsupportedAlgorithm);
        };
        let nc = match (&creds.qop, &creds.nc, &creds.cnonce) {
            (Some(qop), Some(nc), Some(_)) if qop.eq_ignore_ascii_case("auth") => {
                match u32::from_str_radix(nc, 16) {
                    Ok(nc) if nc > 0 => nc,
                    _ => return Rejected(RejectReason::QopRequired),
                }
            }
            _ => return Rejected(RejectReason::QopRequired),
        };
        let state = self.check_nonce(&creds.nonce, now, ip);
        if state == NonceState::Forged {
            return Rejected(RejectReason::ForgedNonce);
        }
        // Unknown users are checked against a throwaway HA1 so timing does not tell them apart.
        let known_user = ha1.is_some();
        let dummy;
        let ha1 = match ha1 {
            Some(h) => h,
            None => {
                dummy = algorithm.hex(creds.username.as_bytes());
                dummy.as_str()
            }
        };
        let expected = creds.expected_response(algorithm, ha1, method);
        let hash_ok: bool = expected
            .as_bytes()
            .ct_eq(creds.response.to_ascii_lowercase().as_bytes())
            .into();
        if !hash_ok || !known_user {
            return Rejected(RejectReason::WrongCredentials);
        }
        let NonceState::Fresh { id, issued } = state else {
            return Verdict::Stale;
        };
        self.record_nc(id, issued, nc, now)
    }

    fn record_nc(&self, id: u64, issued: u64, nc: u32, now: u64) -> Verdict {
        if let Some(mut entry) = self.used.get_mut(&id) {
            if nc <= entry.0 {
                return Verdict::Rejected(RejectReason::Replay);
            }
            entry.0 = nc;
            return Verdict::Accepted;
        }
        if self.used_len.load(Ordering::Relaxed) >= self.config.max_tracked_nonces {
            self.prune(now);
            if self.used_len.load(Ordering::Relaxed) >= self.config.max_tracked_nonces {
                // Full of live nonces: drop the older half rather than lock every phone out.
                // Those nonces lose replay protection; they are also the closest to expiry.
                let cutoff = now.saturating_sub(self.config.nonce_lifetime_secs / 2);
                self.used.retain(|_, (_, issued)| *issued >= cutoff);
                self.used_len.store(self.used.len(), Ordering::Relaxed);
            }
            if self.used_len.load(Ordering::Relaxed) >= self.config.max_tracked_nonces {
                return Verdict::Stale;
            }
        }
        match self.used.entry(id) {
            dashmap::Entry::Occupied(mut e) => {
                if nc <= e.get().0 {
                    return Verdict::Rejected(RejectReason::Replay);
                }
                e.get_mut().0 = nc;
            }
            dashmap::Entry::Vacant(v) => {
                v.insert((nc, issued));
                self.used_len.fetch_add(1, Ordering::Relaxed);
            }
        }
        Verdict::Accepted
    }

    /// Forgets used nonces that have expired (they would be refused as stale anyway).
    pub fn prune(&self, now: u64) {
        let lifetime = self.config.nonce_lifetime_secs;
        self.used
            .retain(|_, (_, issued)| now.saturating_sub(*issued) <= lifetime);
        self.used_len.store(self.used.len(), Ordering::Relaxed);
    }

    pub fn tracked_nonces(&self) -> usize {
        self.used_len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn server(algorithms: Vec<Algorithm>) -> DigestServer {
        DigestServer::with_key(
            DigestConfig {
                realm: "pbx.example.com".into(),
                algorithms,
                nonce_lifetime_secs: 300,
                max_tracked_nonces: 4,
            },
            [7; 32],
        )
    }

    /// RFC 2617 §3.5 and RFC 7616 §3.9.1 worked examples (HTTP, but the formula is SIP's too).
    #[test]
    fn rfc_vectors() {
        let rfc2617 = DigestCredentials {
            username: "Mufasa".into(),
            realm: "testrealm@host.com".into(),
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093".into(),
            uri: "/dir/index.html".into(),
            qop: Some("auth".into()),
            nc: Some("00000001".into()),
            cnonce: Some("0a4f113b".into()),
            ..Default::default()
        };
        let ha1 = Algorithm::Md5.ha1("Mufasa", "testrealm@host.com", "Circle Of Life");
        assert_eq!(
            rfc2617.expected_response(Algorithm::Md5, &ha1, "GET"),
            "6629fae49393a05397450978507c4ef1"
        );
        let rfc7616 = DigestCredentials {
            username: "Mufasa".into(),
            realm: "http-auth@example.org".into(),
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v".into(),
            uri: "/dir/index.html".into(),
            qop: Some("auth".into()),
            nc: Some("00000001".into()),
            cnonce: Some("f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ".into()),
            ..Default::default()
        };
        for (alg, want) in [
            (Algorithm::Md5, "8ca523f5e9506fed4657c9700eebdbec"),
            (
                Algorithm::Sha256,
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
        ] {
            let ha1 = alg.ha1("Mufasa", "http-auth@example.org", "Circle of Life");
            assert_eq!(rfc7616.expected_response(alg, &ha1, "GET"), want, "{alg:?}");
        }
    }

    #[test]
    fn parses_authorization_header() {
        let h = r#"Digest username="101", realm="pbx.example.com", nonce="abc", uri="sip:pbx.example.com", response="0123", algorithm=SHA-256, cnonce="x,y", qop=auth, nc=00000001"#;
        let c = DigestCredentials::parse(h).unwrap();
        assert_eq!(c.username, "101");
        assert_eq!(c.cnonce.as_deref(), Some("x,y"));
        assert_eq!(c.qop.as_deref(), Some("auth"));
        assert_eq!(c.algorithm.as_deref(), Some("SHA-256"));
        assert!(DigestCredentials::parse("Basic abc").is_none());
        assert!(DigestCredentials::parse(r#"Digest username="unterminated"#).is_none());
    }

    fn answer(
        s: &DigestServer,
        alg: Algorithm,
        password: &str,
        nonce: &str,
        nc: u32,
    ) -> DigestCredentials {
        let mut c = DigestCredentials {
            username: "101".into(),
            realm: "pbx.example.com".into(),
            nonce: nonce.into(),
            uri: "sip:pbx.example.com".into(),
            algorithm: Some(alg.name().into()),
            qop: Some("auth".into()),
            nc: Some(format!("{nc:08x}")),
            cnonce: Some("c0ffee".into()),
            ..Default::default()
        };
        let ha1 = alg.ha1("101", s.realm(), password);
        c.response = c.expected_response(alg, &ha1, "REGISTER");
        c
    }

    #[test]
    fn challenge_offers_sha256_first_with_qop() {
        let s = server(vec![Algorithm::Sha256, Algorithm::Md5]);
        let ch = s.challenges(1000, false, IP);
        assert_eq!(ch.len(), 2);
        assert!(ch[0].contains("algorithm=SHA-256") && ch[0].contains("qop=\"auth\""));
        assert!(ch[1].contains("algorithm=MD5"));
        assert!(!ch[0].contains("stale"));
        assert!(s.challenges(1000, true, IP)[0].ends_with("stale=true"));
    }

    #[test]
    fn accepts_right_password_refuses_wrong_and_unknown_alike() {
        let s = server(vec![Algorithm::Sha256, Algorithm::Md5]);
        let ha1 = |alg: Algorithm| alg.ha1("101", "pbx.example.com", "pw");
        for alg in [Algorithm::Sha256, Algorithm::Md5] {
            let nonce = s.new_nonce(1000, IP);
            let good = answer(&s, alg, "pw", &nonce, 1);
            assert_eq!(
                s.verify(&good, "REGISTER", Some(&ha1(alg)), 1001, IP),
                Verdict::Accepted
            );
            let wrong = answer(&s, alg, "nope", &nonce, 2);
            let unknown = s.verify(&wrong, "REGISTER", None, 1001, IP);
            assert_eq!(
                s.verify(&wrong, "REGISTER", Some(&ha1(alg)), 1001, IP),
                unknown
            );
            assert_eq!(unknown, Verdict::Rejected(RejectReason::WrongCredentials));
        }
    }

    #[test]
    fn expired_nonce_with_right_hash_is_stale() {
        let s = server(vec![Algorithm::Md5]);
        let ha1 = Algorithm::Md5.ha1("101", "pbx.example.com", "pw");
        let nonce = s.new_nonce(1000, IP);
        let good = answer(&s, Algorithm::Md5, "pw", &nonce, 1);
        assert_eq!(
            s.verify(&good, "REGISTER", Some(&ha1), 1300, IP),
            Verdict::Accepted
        );
        let later = answer(&s, Algorithm::Md5, "pw", &nonce, 2);
        assert_eq!(
            s.verify(&later, "REGISTER", Some(&ha1), 1301, IP),
            Verdict::Stale
        );
        // A wrong password is never "stale": it is refused.
        let wrong = answer(&s, Algorithm::Md5, "x", &nonce, 3);
        assert!(matches!(
            s.verify(&wrong, "REGISTER", Some(&ha1), 1301, IP),
            Verdict::Rejected(_)
        ));
    }

    #[test]
    fn replayed_nc_is_refused() {
        let s = server(vec![Algorithm::Md5]);
        let ha1 = Algorithm::Md5.ha1("101", "pbx.example.com", "pw");
        let nonce = s.new_nonce(1000, IP);
        let first = answer(&s, Algorithm::Md5, "pw", &nonce, 1);
        assert_eq!(
            s.verify(&first, "REGISTER", Some(&ha1), 1000, IP),
            Verdict::Accepted
        );
        assert_eq!(
            s.verify(&first, "REGISTER", Some(&ha1), 1000, IP),
            Verdict::Rejected(RejectReason::Replay)
        );
        let next = answer(&s, Algorithm::Md5, "pw", &nonce, 2);
        assert_eq!(
            s.verify(&next, "REGISTER", Some(&ha1), 1000, IP),
            Verdict::Accepted
        );
    }

    #[test]
    fn forged_nonce_and_missing_qop_refused() {
        let s = server(vec![Algorithm::Md5]);
        let ha1 = Algorithm::Md5.ha1("101", "pbx.example.com", "pw");
        let other = server(vec![Algorithm::Md5]);
        let other = DigestServer::with_key(other.config.clone(), [9; 32]);
        let forged = answer(&s, Algorithm::Md5, "pw", &other.new_nonce(1000, IP), 1);
        assert_eq!(
            s.verify(&forged, "REGISTER", Some(&ha1), 1000, IP),
            Verdict::Rejected(RejectReason::ForgedNonce)
        );
        let mut no_qop = answer(&s, Algorithm::Md5, "pw", &s.new_nonce(1000, IP), 1);
        no_qop.qop = None;
        assert_eq!(
            s.verify(&no_qop, "REGISTER", Some(&ha1), 1000, IP),
            Verdict::Rejected(RejectReason::QopRequired)
        );
        let sha = answer(&s, Algorithm::Sha256, "pw", &s.new_nonce(1000, IP), 1);
        assert_eq!(
            s.verify(&sha, "REGISTER", Some(&ha1), 1000, IP),
            Verdict::Rejected(RejectReason::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn a_nonce_only_works_from_the_address_it_was_sent_to() {
        let s = server(vec![Algorithm::Md5]);
        let ha1 = Algorithm::Md5.ha1("101", "pbx.example.com", "pw");
        let c = answer(&s, Algorithm::Md5, "pw", &s.new_nonce(1000, IP), 1);
        let elsewhere: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(
            s.verify(&c, "REGISTER", Some(&ha1), 1000, elsewhere),
            Verdict::Rejected(RejectReason::ForgedNonce)
        );
        assert_eq!(
            s.verify(&c, "REGISTER", Some(&ha1), 1000, IP),
            Verdict::Accepted
        );
    }

    #[test]
    fn used_nonce_table_is_bounded() {
        let s = server(vec![Algorithm::Md5]);
        let ha1 = Algorithm::Md5.ha1("101", "pbx.example.com", "pw");
        for i in 0..10 {
            let c = answer(&s, Algorithm::Md5, "pw", &s.new_nonce(1000, IP), 1);
            let v = s.verify(&c, "REGISTER", Some(&ha1), 1000, IP);
            assert_eq!(
                v,
                if i < 4 {
                    Verdict::Accepted
                } else {
                    Verdict::Stale
                }
            );
        }
        assert_eq!(s.tracked_nonces(), 4);
        s.prune(2000);
        assert_eq!(s.tracked_nonces(), 0);
    }
}
