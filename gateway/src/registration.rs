//! The SIP side of the gateway: digest authentication, the REGISTER handler, OPTIONS, and the
//! write-behind that keeps registrations in the store.

use crate::metrics::{method_label, Metrics, ReasonLabel};
use crate::store::{Store, StoredBinding};
use smsgw_sip::digest::{Algorithm, DigestCredentials, DigestServer, RejectReason, Verdict};
use smsgw_sip::guard::AuthGuard;
use smsgw_sip::registrar::{parse_register, Binding, RegisterMeta, Registrar};
use smsgw_sip::uri::NameAddr;
use smsgw_sip::{Flow, Handler, Method, Response, ServerTx};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const ALLOW: &str = "REGISTER, OPTIONS, MESSAGE";

/// RFC 3261 §8.2.2.3: we support no extensions, so any `Require` gets 420 naming them.
fn unsupported_extensions(tx: &ServerTx) -> Option<String> {
    let required: Vec<&str> = tx.request.headers.list("Require").collect();
    (!required.is_empty()).then(|| required.join(", "))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The stored HA1 of an extension for each algorithm, so no password is hashed per request.
pub struct Ha1 {
    pub md5: Box<str>,
    pub sha256: Box<str>,
}

impl Ha1 {
    pub fn new(user: &str, realm: &str, password: &str) -> Self {
        Self {
            md5: Algorithm::Md5.ha1(user, realm, password).into(),
            sha256: Algorithm::Sha256.ha1(user, realm, password).into(),
        }
    }

    fn for_algorithm(&self, algorithm: Option<&str>) -> Option<&str> {
        match Algorithm::parse(algorithm)? {
            Algorithm::Md5 => Some(&self.md5),
            Algorithm::Sha256 => Some(&self.sha256),
        }
    }
}

pub struct SipService {
    /// Set once the messaging pipelines exist; MESSAGE is refused with 503 before.
    pub messaging: std::sync::OnceLock<Arc<crate::messaging::Messaging>>,
    pub registrar: Arc<Registrar>,
    pub digest: DigestServer,
    pub guard: AuthGuard,
    pub users: HashMap<Box<str>, Ha1>,
    pub metrics: Arc<Metrics>,
    pub dirty: Arc<DirtyAors>,
}

impl SipService {
    fn reply(&self, tx: ServerTx, resp: Response) {
        self.metrics.respond(tx, resp);
    }

    fn challenge(&self, tx: ServerTx, stale: bool) {
        let mut resp = Response::to(&tx.request, 401);
        for value in self
            .digest
            .challenges(unix_now(), stale, tx.flow.remote.ip())
        {
            resp.headers.push("WWW-Authenticate", value);
        }
        self.reply(tx, resp);
    }

    fn forbid(&self, tx: ServerTx, why: &str) {
        let resp = Response::with_reason(&tx.request, 403, &format!("Forbidden ({why})"));
        self.reply(tx, resp);
    }

    /// Digest-authenticates the request. `Ok(user)` when it carries valid credentials; otherwise
    /// the transaction has been answered (challenge or refusal) and `Err` gives it back spent.
    fn authenticate(&self, tx: ServerTx) -> Result<(ServerTx, String), ()> {
        let ip = tx.flow.remote.ip();
        let now = Instant::now();
        if self.guard.is_blocked(ip, now) {
            self.metrics.auth_blocked.inc();
            self.forbid(tx, "too many failed authentications; try again later");
            return Err(());
        }
        let creds = tx
            .request
            .headers
            .get_all("Authorization")
            .filter_map(DigestCredentials::parse)
            .find(|c| c.realm == self.digest.realm());
        let Some(creds) = creds else {
            self.challenge(tx, false);
            return Err(());
        };
        let ha1 = self
            .users
            .get(creds.username.as_str())
            .and_then(|h| h.for_algorithm(creds.algorithm.as_deref()));
        let method = tx.request.method.as_str().to_string();
        match self.digest.verify(&creds, &method, ha1, unix_now(), ip) {
            Verdict::Accepted => {
                let algorithm =
                    Algorithm::parse(creds.algorithm.as_deref()).map_or("unknown", Algorithm::name);
                self.metrics
                    .auth_successes
                    .get_or_create(&crate::metrics::AlgorithmLabel { algorithm })
                    .inc();
                self.guard.record_success(ip);
                Ok((tx, creds.username))
            }
            Verdict::Stale => {
                self.challenge(tx, true);
                Err(())
            }
            Verdict::Rejected(reason) => {
                self.metrics
                    .auth_failures
                    .get_or_create(&ReasonLabel {
                        reason: reason.label(),
                    })
                    .inc();
                // Only a wrong answer to a nonce we sent to this very address counts: nonces are
                // bound to the address, so spoofed packets cannot get a phone blocked.
                if reason == RejectReason::WrongCredentials && self.guard.record_failure(ip, now) {
                    tracing::warn!(source = %ip, "blocking source address after repeated authentication failures");
                }
                tracing::info!(source = %tx.flow.remote, user = %creds.username, reason = %reason, "authentication failed");
                match reason {
                    RejectReason::WrongCredentials => self.forbid(tx, "authentication failed"),
                    RejectReason::QopRequired | RejectReason::UnsupportedAlgorithm => {
                        self.forbid(tx, &reason.to_string())
                    }
                    // A nonce from before a key change, another realm, or a replay: a fresh
                    // challenge lets an honest phone recover and gives an attacker nothing.
                    RejectReason::WrongRealm
                    | RejectReason::ForgedNonce
                    | RejectReason::Replay
                    | RejectReason::NonceTableFull => self.challenge(tx, false),
                }
                Err(())
            }
        }
    }

    fn on_register(&self, tx: ServerTx) {
        let Some(aor) = tx
            .request
            .headers
            .get("To")
            .and_then(NameAddr::parse)
            .and_then(|n| n.sip_uri())
            .and_then(|u| u.user)
        else {
            let resp = Response::with_reason(&tx.request, 400, "Bad Request (To has no user part)");
            return self.reply(tx, resp);
        };
        let Ok((tx, user)) = self.authenticate(tx) else {
            return;
        };
        if user != aor {
            return self.forbid(tx, "the authenticated user does not match the To address");
        }
        let (contacts, header_expires) = match parse_register(&tx.request) {
            Ok(parsed) => parsed,
            Err(e) => {
                let resp =
                    Response::with_reason(&tx.request, e.status(), &format!("Bad Request ({e})"));
                return self.reply(tx, resp);
            }
        };
        let (cseq, _) = tx.request.cseq().unwrap_or((0, Method::Register));
        let meta = RegisterMeta {
            header_expires,
            call_id: tx.request.call_id(),
            cseq,
            flow: tx.flow,
        };
        let now = Instant::now();
        let result = self.registrar.register(&aor, contacts, meta, now);
        match result {
            Ok(bindings) => {
                self.dirty.mark(&aor);
                if let Some(m) = self.messaging.get().filter(|_| !bindings.is_empty()) {
                    // Store-and-forward: a phone that (re)registers gets what waited for it.
                    m.on_registered(&aor);
                }
                let mut resp = Response::to(&tx.request, 200);
                for b in &bindings {
                    resp.headers.push("Contact", contact_value(b, now));
                }
                resp.headers
                    .push("Date", httpdate::fmt_http_date(SystemTime::now()));
                self.reply(tx, resp);
            }
            Err(e) => {
                let status = e.status();
                let mut resp = Response::with_reason(
                    &tx.request,
                    status,
                    &format!("{} ({e})", smsgw_sip::message::reason_phrase(status)),
                );
                if status == 423 {
                    resp.headers
                        .push("Min-Expires", self.registrar.limits().min.to_string());
                }
                self.reply(tx, resp);
            }
        }
    }
}

impl SipService {
    /// A MESSAGE: a trunk peer by its source address (never challenged), else an extension by
    /// digest, as for REGISTER.
    fn on_message(&self, tx: ServerTx) {
        let Some(messaging) = self.messaging.get() else {
            let resp = Response::to(&tx.request, 503).header("Retry-After", "5");
            return self.reply(tx, resp);
        };
        let ip = tx.flow.remote.ip();
        let trunk = messaging
            .settings
            .trunks
            .iter()
            .find(|t| t.allow.iter().any(|net| net.contains(&ip)));
        if let Some(t) = trunk {
            return messaging
                .on_sip_message(tx, crate::messaging::OwnedSource::Trunk(t.name.clone()));
        }
        let Ok((tx, user)) = self.authenticate(tx) else {
            return;
        };
        messaging.on_sip_message(tx, crate::messaging::OwnedSource::Extension(user));
    }
}

fn contact_value(b: &Binding, now: Instant) -> String {
    let mut value = format!("<{}>;expires={}", b.contact, b.remaining(now).as_secs());
    if let Some(instance) = &b.instance {
        value.push_str(&format!(";+sip.instance=\"{instance}\""));
    }
    if let Some(reg_id) = b.reg_id {
        value.push_str(&format!(";reg-id={reg_id}"));
    }
    value
}

impl Handler for SipService {
    fn on_request(&self, tx: ServerTx) {
        self.metrics
            .sip_requests
            .get_or_create(&crate::metrics::MethodLabel {
                method: method_label(&tx.request.method),
            })
            .inc();
        if let Some(unsupported) = unsupported_extensions(&tx) {
            let resp = Response::to(&tx.request, 420).header("Unsupported", unsupported);
            return self.reply(tx, resp);
        }
        match tx.request.method {
            Method::Register => self.on_register(tx),
            Method::Message => self.on_message(tx),
            Method::Options => {
                let resp = Response::to(&tx.request, 200)
                    .header("Allow", ALLOW)
                    .header("Accept", "text/plain");
                self.reply(tx, resp);
            }
            Method::Other(_) => {
                let resp = Response::to(&tx.request, 501).header("Allow", ALLOW);
                self.reply(tx, resp);
            }
            _ => {
                let resp = Response::to(&tx.request, 405).header("Allow", ALLOW);
                self.reply(tx, resp);
            }
        }
    }

    fn on_refused(&self, source: std::net::SocketAddr, error: &smsgw_sip::message::ParseError) {
        self.metrics.sip_malformed.inc();
        tracing::debug!(%source, %error, "malformed SIP message");
    }
}

/// Addresses-of-record whose bindings changed since the last write to the store. Its size is
/// bounded by the number of configured extensions.
#[derive(Default)]
pub struct DirtyAors {
    set: Mutex<HashSet<Box<str>>>,
    notify: Notify,
}

impl DirtyAors {
    pub fn mark(&self, aor: &str) {
        let inserted = self.set.lock().expect("dirty lock").insert(aor.into());
        if inserted {
            self.notify.notify_one();
        }
    }

    fn take(&self) -> Vec<Box<str>> {
        self.set.lock().expect("dirty lock").drain().collect()
    }
}

pub fn to_stored(aor: &str, b: &Binding, now: Instant, now_unix: u64) -> StoredBinding {
    StoredBinding {
        aor: aor.to_string(),
        contact: b.contact.to_string(),
        transport: b.flow.transport,
        local: b.flow.local,
        remote: b.flow.remote,
        expires_at: (now_unix + b.remaining(now).as_secs()) as i64,
        call_id: b.call_id.to_string(),
        cseq: b.cseq,
        instance: b.instance.as_deref().map(str::to_string),
        reg_id: b.reg_id,
    }
}

pub fn from_stored(s: StoredBinding, now: Instant, now_unix: u64) -> Binding {
    let left = (s.expires_at.max(0) as u64).saturating_sub(now_unix);
    Binding {
        contact: s.contact.into(),
        flow: Flow {
            transport: s.transport,
            local: s.local,
            remote: s.remote,
            conn: None,
        },
        expires_at: now + Duration::from_secs(left),
        call_id: s.call_id.into(),
        cseq: s.cseq,
        instance: s.instance.map(Into::into),
        reg_id: s.reg_id,
    }
}

/// Writes changed registrations to the store in batches until cancelled, then once more.
pub async fn persist_bindings<S: Store>(
    store: S,
    registrar: Arc<Registrar>,
    dirty: Arc<DirtyAors>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    loop {
        let stopping = tokio::select! {
            _ = dirty.notify.notified() => false,
            _ = cancel.cancelled() => true,
        };
        if !stopping {
            // Let a burst of REGISTERs gather into one transaction.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let aors = dirty.take();
        if !aors.is_empty() {
            let now = Instant::now();
            let now_unix = unix_now();
            let batch: Vec<_> = aors
                .iter()
                .map(|aor| {
                    let list = registrar
                        .lookup(aor, now)
                        .iter()
                        .map(|b| to_stored(aor, b, now, now_unix))
                        .collect();
                    (aor.to_string(), list)
                })
                .collect();
            if let Err(e) = store.replace_bindings(batch).await {
                metrics.store_errors.inc();
                tracing::error!(error = %e, "cannot save registrations; will retry");
                for aor in &aors {
                    dirty.mark(aor);
                }
                if !stopping {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Expires bindings, prunes auth bookkeeping and refreshes gauges, once a second.
pub async fn housekeeping(
    service: Arc<SipService>,
    endpoint: smsgw_sip::Endpoint,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        ticks += 1;
        let now = Instant::now();
        for aor in service.registrar.expire(now) {
            tracing::debug!(%aor, "binding expired");
            service.dirty.mark(&aor);
        }
        if ticks.is_multiple_of(60) {
            service.digest.prune(unix_now());
            service.guard.prune(now);
        }
        let m = &service.metrics;
        m.registrations
            .set(service.registrar.binding_count() as i64);
        m.server_transactions
            .set(endpoint.server_transactions() as i64);
        m.tcp_connections.set(endpoint.open_connections() as i64);
    }
}
