//! The registrar's location service (RFC 3261 §10.3): bindings per address-of-record, each tied
//! to the flow it registered on. Pure state: the caller passes `now`, persists and answers.

use crate::message::Request;
use crate::transport::Flow;
use crate::uri::NameAddr;
use dashmap::DashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct ExpiryLimits {
    pub min: u32,
    pub max: u32,
    pub default: u32,
}

#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    pub limits: ExpiryLimits,
    pub max_contacts_per_aor: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The Contact URI as the phone sent it (without angle brackets).
    pub contact: Box<str>,
    pub flow: Flow,
    pub expires_at: Instant,
    pub call_id: Box<str>,
    pub cseq: u32,
    /// RFC 5626 `+sip.instance`, which identifies the device across Contact changes.
    pub instance: Option<Box<str>>,
    pub reg_id: Option<u32>,
}

impl Binding {
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    fn same_device(&self, contact: &ContactRequest) -> bool {
        match (&self.instance, &contact.instance) {
            (Some(a), Some(b)) => **a == **b && self.reg_id == contact.reg_id,
            _ => *self.contact == *contact.uri,
        }
    }
}

/// One Contact of a REGISTER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRequest {
    pub uri: String,
    pub expires: Option<u32>,
    pub instance: Option<String>,
    pub reg_id: Option<u32>,
}

/// What the REGISTER asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactSet {
    /// No Contact: a query for the current bindings.
    Query,
    /// `Contact: *` with `Expires: 0`: remove every binding.
    RemoveAll,
    List(Vec<ContactRequest>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("the requested expiry is below the minimum of {min} s")]
    IntervalTooBrief { min: u32 },
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("more than {max} contacts for one extension")]
    TooManyContacts { max: usize },
    #[error("CSeq is not above the one already seen for this Call-ID")]
    OutOfOrder,
}

impl RegisterError {
    pub fn status(&self) -> u16 {
        match self {
            Self::IntervalTooBrief { .. } => 423,
            Self::BadRequest(_) => 400,
            Self::TooManyContacts { .. } => 403,
            Self::OutOfOrder => 500,
        }
    }
}

/// Reads the Contact and Expires headers of a REGISTER.
pub fn parse_register(req: &Request) -> Result<(ContactSet, Option<u32>), RegisterError> {
    let header_expires = match req.headers.get("Expires") {
        Some(v) => {
            Some(parse_delta(v).ok_or(RegisterError::BadRequest("malformed Expires header"))?)
        }
        None => None,
    };
    let items: Vec<&str> = req.headers.list("Contact").collect();
    if items.is_empty() {
        return Ok((ContactSet::Query, header_expires));
    }
    if items.contains(&"*") {
        if items.len() != 1 || header_expires != Some(0) {
            return Err(RegisterError::BadRequest(
                "Contact: * must stand alone and come with Expires: 0",
            ));
        }
        return Ok((ContactSet::RemoveAll, header_expires));
    }
    let mut contacts = Vec::with_capacity(items.len());
    for item in items {
        let na =
            NameAddr::parse(item).ok_or(RegisterError::BadRequest("malformed Contact header"))?;
        let scheme = crate::uri::SipUri::parse(&na.uri).map(|u| u.scheme);
        if !matches!(
            scheme,
            Some(crate::uri::Scheme::Sip | crate::uri::Scheme::Sips)
        ) {
            return Err(RegisterError::BadRequest(
                "Contact is not a sip: or sips: URI",
            ));
        }
        let expires = match na.param("expires") {
            Some(v) => {
                Some(parse_delta(v).ok_or(RegisterError::BadRequest("malformed Contact expires"))?)
            }
            None => None,
        };
        contacts.push(ContactRequest {
            instance: na
                .param("+sip.instance")
                .map(|s| s.trim_matches('"').to_string()),
            reg_id: na.param("reg-id").and_then(|s| s.parse().ok()),
            uri: na.uri,
            expires,
        });
    }
    Ok((ContactSet::List(contacts), header_expires))
}

/// A delta-seconds value; values beyond u32 saturate (RFC 3261 §20.19 allows any size).
fn parse_delta(value: &str) -> Option<u32> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        v.parse::<u64>()
            .map_or(u32::MAX, |n| n.min(u32::MAX as u64) as u32),
    )
}

pub struct Registrar {
    config: RegistrarConfig,
    aors: DashMap<Box<str>, Vec<Binding>>,
    bindings: AtomicUsize,
}

/// The inputs of one REGISTER besides its contacts.
#[derive(Debug, Clone, Copy)]
pub struct RegisterMeta<'a> {
    pub header_expires: Option<u32>,
    pub call_id: &'a str,
    pub cseq: u32,
    pub flow: Flow,
}

impl Registrar {
    pub fn new(config: RegistrarConfig) -> Self {
        Self {
            config,
            aors: DashMap::new(),
            bindings: AtomicUsize::new(0),
        }
    }

    pub fn limits(&self) -> ExpiryLimits {
        self.config.limits
    }

    /// Applies a REGISTER (RFC 3261 §10.3 steps 6–8) and returns the bindings now in force.
    pub fn register(
        &self,
        aor: &str,
        contacts: ContactSet,
        meta: RegisterMeta<'_>,
        now: Instant,
    ) -> Result<Vec<Binding>, RegisterError> {
        let limits = self.config.limits;
        let list = match contacts {
            ContactSet::Query => return Ok(self.lookup(aor, now)),
            ContactSet::RemoveAll => {
                if let Some((_, old)) = self.aors.remove(aor) {
                    self.bindings.fetch_sub(old.len(), Ordering::Relaxed);
                }
                return Ok(Vec::new());
            }
            ContactSet::List(list) => list,
        };
        let mut requested = Vec::with_capacity(list.len());
        for contact in list {
            let expires = contact
                .expires
                .or(meta.header_expires)
                .unwrap_or(limits.default);
            if expires != 0 && expires < limits.min {
                return Err(RegisterError::IntervalTooBrief { min: limits.min });
            }
            requested.push((contact, expires.min(limits.max)));
        }
        let mut entry = self.aors.entry(aor.into()).or_default();
        let before = entry.len();
        entry.retain(|b| b.expires_at > now);
        for (contact, _) in &requested {
            if let Some(b) = entry.iter().find(|b| b.same_device(contact)) {
                if *b.call_id == *meta.call_id && meta.cseq <= b.cseq {
                    let after = entry.len();
                    drop(entry);
                    self.adjust(before, after);
                    return Err(RegisterError::OutOfOrder);
                }
            }
        }
        for (contact, expires) in requested {
            entry.retain(|b| !b.same_device(&contact));
            if expires == 0 {
                continue;
            }
            entry.push(Binding {
                contact: contact.uri.into(),
                flow: meta.flow,
                expires_at: now + Duration::from_secs(expires.into()),
                call_id: meta.call_id.into(),
                cseq: meta.cseq,
                instance: contact.instance.map(Into::into),
                reg_id: contact.reg_id,
            });
        }
        if entry.len() > self.config.max_contacts_per_aor {
            // Keep the newest: an old phone that never unregistered should not lock the user out.
            let excess = entry.len() - self.config.max_contacts_per_aor;
            entry.drain(..excess);
        }
        // Most extensions have one phone: do not keep Vec's default spare capacity per extension.
        entry.shrink_to_fit();
        let current = entry.clone();
        let after = entry.len();
        let empty = entry.is_empty();
        drop(entry);
        if empty {
            self.aors.remove_if(aor, |_, v| v.is_empty());
        }
        self.adjust(before, after);
        Ok(current)
    }

    fn adjust(&self, before: usize, after: usize) {
        if after >= before {
            self.bindings.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.bindings.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// The live bindings of an address-of-record.
    pub fn lookup(&self, aor: &str, now: Instant) -> Vec<Binding> {
        self.aors
            .get(aor)
            .map(|v| v.iter().filter(|b| b.expires_at > now).cloned().collect())
            .unwrap_or_default()
    }

    /// Removes expired bindings; returns the addresses-of-record that changed.
    pub fn expire(&self, now: Instant) -> Vec<Box<str>> {
        let mut changed = Vec::new();
        let mut removed = 0;
        self.aors.retain(|aor, v| {
            let before = v.len();
            v.retain(|b| b.expires_at > now);
            if v.len() != before {
                removed += before - v.len();
                changed.push(aor.clone());
            }
            !v.is_empty()
        });
        self.bindings.fetch_sub(removed, Ordering::Relaxed);
        changed
    }

    /// Puts back bindings read from the store at start.
    pub fn restore(&self, aor: &str, bindings: Vec<Binding>) {
        if bindings.is_empty() {
            return;
        }
        self.bindings.fetch_add(bindings.len(), Ordering::Relaxed);
        if let Some(old) = self.aors.insert(aor.into(), bindings) {
            self.bindings.fetch_sub(old.len(), Ordering::Relaxed);
        }
    }

    /// Every live binding, for the admin API.
    pub fn snapshot(&self, now: Instant) -> Vec<(Box<str>, Binding)> {
        let mut all: Vec<_> = self
            .aors
            .iter()
            .flat_map(|e| {
                let aor = e.key().clone();
                e.value()
                    .iter()
                    .filter(|b| b.expires_at > now)
                    .map(|b| (aor.clone(), b.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.contact.cmp(&b.1.contact)));
        all
    }

    pub fn binding_count(&self) -> usize {
        self.bindings.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{parse_datagram, Message};
    use crate::transport::Transport;

    fn registrar() -> Registrar {
        Registrar::new(RegistrarConfig {
            limits: ExpiryLimits {
                min: 60,
                max: 3600,
                default: 600,
            },
            max_contacts_per_aor: 3,
        })
    }

    fn flow(port: u16) -> Flow {
        Flow {
            transport: Transport::Udp,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: format!("127.0.0.1:{port}").parse().unwrap(),
            conn: None,
        }
    }

    fn meta(call_id: &str, cseq: u32, expires: Option<u32>, port: u16) -> RegisterMeta<'_> {
        RegisterMeta {
            header_expires: expires,
            call_id,
            cseq,
            flow: flow(port),
        }
    }

    fn contact(uri: &str, expires: Option<u32>) -> ContactSet {
        ContactSet::List(vec![ContactRequest {
            uri: uri.into(),
            expires,
            instance: None,
            reg_id: None,
        }])
    }

    fn register_req(contact_lines: &str) -> Request {
        let text = format!(
            "REGISTER sip:pbx SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:101@pbx>;tag=1\r\n\
             To: <sip:101@pbx>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n{contact_lines}Content-Length: 0\r\n\r\n"
        );
        match parse_datagram(text.as_bytes()).unwrap() {
            Message::Request(r) => r,
            Message::Response(_) => unreachable!(),
        }
    }

    #[test]
    fn parses_contact_forms() {
        let (set, exp) = parse_register(&register_req(
            "Contact: <sip:101@10.0.0.1:5062>;expires=120, <sip:101@10.0.0.2>;+sip.instance=\"<urn:uuid:1>\";reg-id=1\r\nExpires: 300\r\n",
        ))
        .unwrap();
        assert_eq!(exp, Some(300));
        let ContactSet::List(list) = set else {
            panic!()
        };
        assert_eq!(list[0].expires, Some(120));
        assert_eq!(list[1].instance.as_deref(), Some("<urn:uuid:1>"));
        assert_eq!(list[1].reg_id, Some(1));
        assert_eq!(
            parse_register(&register_req("")).unwrap().0,
            ContactSet::Query
        );
        assert_eq!(
            parse_register(&register_req("Contact: *\r\nExpires: 0\r\n"))
                .unwrap()
                .0,
            ContactSet::RemoveAll
        );
        assert!(parse_register(&register_req("Contact: *\r\n")).is_err());
        assert!(parse_register(&register_req("Contact: <sip:a@b>\r\nExpires: soon\r\n")).is_err());
        assert!(parse_register(&register_req("Contact: <http://a>\r\n")).is_err());
        assert!(parse_register(&register_req("Contact: <tel:+15551234567>\r\n")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_limits() {
        let r = registrar();
        let now = Instant::now();
        let b = r
            .register(
                "101",
                contact("sip:101@a", None),
                meta("c", 1, None, 1),
                now,
            )
            .unwrap();
        assert_eq!(b[0].remaining(now), Duration::from_secs(600));
        let b = r
            .register(
                "101",
                contact("sip:101@a", Some(99999)),
                meta("c", 2, None, 1),
                now,
            )
            .unwrap();
        assert_eq!(b[0].remaining(now), Duration::from_secs(3600));
        assert_eq!(
            r.register(
                "101",
                contact("sip:101@a", Some(30)),
                meta("c", 3, None, 1),
                now
            ),
            Err(RegisterError::IntervalTooBrief { min: 60 })
        );
        // The header applies when the contact has no parameter.
        let b = r
            .register(
                "101",
                contact("sip:101@a", None),
                meta("c", 4, Some(120), 1),
                now,
            )
            .unwrap();
        assert_eq!(b[0].remaining(now), Duration::from_secs(120));
    }

    #[tokio::test(start_paused = true)]
    async fn several_contacts_remove_and_wildcard() {
        let r = registrar();
        let now = Instant::now();
        r.register(
            "101",
            contact("sip:101@a", None),
            meta("c1", 1, None, 1),
            now,
        )
        .unwrap();
        let b = r
            .register(
                "101",
                contact("sip:101@b", None),
                meta("c2", 1, None, 2),
                now,
            )
            .unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(r.binding_count(), 2);
        let b = r
            .register(
                "101",
                contact("sip:101@a", Some(0)),
                meta("c1", 2, None, 1),
                now,
            )
            .unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(&*b[0].contact, "sip:101@b");
        r.register("101", ContactSet::RemoveAll, meta("c3", 1, Some(0), 3), now)
            .unwrap();
        assert!(r.lookup("101", now).is_empty());
        assert_eq!(r.binding_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_order_cseq_refused_and_newest_flow_wins() {
        let r = registrar();
        let now = Instant::now();
        r.register(
            "101",
            contact("sip:101@a", None),
            meta("c", 5, None, 1),
            now,
        )
        .unwrap();
        assert_eq!(
            r.register(
                "101",
                contact("sip:101@a", None),
                meta("c", 5, None, 1),
                now
            ),
            Err(RegisterError::OutOfOrder)
        );
        let b = r
            .register(
                "101",
                contact("sip:101@a", None),
                meta("c", 6, None, 7),
                now,
            )
            .unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].flow.remote.port(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn bindings_expire_on_their_own() {
        let r = registrar();
        r.register(
            "101",
            contact("sip:101@a", Some(60)),
            meta("c", 1, None, 1),
            Instant::now(),
        )
        .unwrap();
        r.register(
            "102",
            contact("sip:102@a", Some(600)),
            meta("d", 1, None, 2),
            Instant::now(),
        )
        .unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(r.expire(Instant::now()).is_empty());
        assert_eq!(r.lookup("101", Instant::now()).len(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(r.expire(Instant::now()), vec![Box::<str>::from("101")]);
        assert!(r.lookup("101", Instant::now()).is_empty());
        assert_eq!(r.binding_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn contact_cap_keeps_newest() {
        let r = registrar();
        let now = Instant::now();
        for i in 0..5 {
            r.register(
                "101",
                contact(&format!("sip:101@h{i}"), None),
                meta("c", i + 1, None, 1),
                now,
            )
            .unwrap();
        }
        let b = r.lookup("101", now);
        assert_eq!(b.len(), 3);
        assert_eq!(&*b[2].contact, "sip:101@h4");
        assert_eq!(r.binding_count(), 3);
    }
}
