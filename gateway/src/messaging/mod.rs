//! The messaging pipelines: outbound (SIP MESSAGE or admin API → rules → policy → outbox →
//! Twilio), inbound (signed webhook → inbox → rules → SIP MESSAGE to every contact, stored until
//! delivered), status callbacks, and notices back to phones.
//!
//! Durability: a message is committed before any answer leaves (SIP final response, 200 to a
//! webhook). Exactly once towards Twilio: a request whose outcome is unknown marks the row
//! `in_doubt`; before sending it again the outbox looks it up at Twilio (`reconcile`).

mod delivery;
mod inbound;
mod outbound;
mod pacing;

pub use outbound::OwnedSource;

use crate::config::Settings;
use crate::metrics::{MessageLabel, Metrics};
use crate::store::{Direction, Kind, Message, NewMessage, SqliteStore, Store};
use crate::twilio::{Account, TwilioClient};
use smsgw_rules::MessageStatus;
use smsgw_sip::registrar::Registrar;
use smsgw_sip::Endpoint;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, Semaphore};

/// Status callbacks kept for a SID not saved yet (parameters, our message id from the URL),
/// and when the first arrived.
type EarlyStatus = (Vec<(Vec<(String, String)>, Option<i64>)>, i64);

/// The query parameter of a status callback URL that carries our message id.
pub const MESSAGE_ID_PARAM: &str = "m";

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Where an inbound message (or a notice) goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    Extension(String),
    Trunk(String),
}

impl Owner {
    fn columns(&self) -> (Option<String>, Option<String>) {
        match self {
            Self::Extension(e) => (Some(e.clone()), None),
            Self::Trunk(t) => (None, Some(t.clone())),
        }
    }

    fn from_columns(extension: Option<String>, trunk: Option<String>) -> Option<Self> {
        match (extension, trunk) {
            (Some(e), _) => Some(Self::Extension(e)),
            (None, Some(t)) => Some(Self::Trunk(t)),
            (None, None) => None,
        }
    }
}

pub struct Messaging {
    pub settings: Arc<Settings>,
    pub store: SqliteStore,
    pub twilio: TwilioClient,
    pub endpoint: Endpoint,
    pub registrar: Arc<Registrar>,
    pub metrics: Arc<Metrics>,
    accounts: Vec<Account>,
    /// Webhook token → index into `settings.sms`; and the reverse.
    tokens: RwLock<(HashMap<String, usize>, Vec<String>)>,
    last_webhook: RwLock<HashMap<String, SystemTime>>,
    pacer: pacing::Pacer,
    limits: outbound::Limits,
    outbox_kick: Notify,
    /// Bounds concurrent MESSAGE handling and sends, so a flood is refused instead of queued.
    in_flight: Arc<Semaphore>,
    delivering: dashmap::DashSet<Owner>,
    redeliver: dashmap::DashSet<Owner>,
    /// Inbound messages handed to the deliverers in memory as they commit.
    inboxes: Arc<delivery::Inboxes>,
    /// (recipient, sender) pairs that opted out: mirrors the store, so the check per outbound
    /// message costs no database round trip.
    opt_outs: dashmap::DashSet<(String, String)>,
    /// Extensions and trunks with inbound messages waiting, so a REGISTER costs no database
    /// query when there is nothing to deliver (the usual case).
    waiting: dashmap::DashSet<Owner>,
    /// Status callbacks that arrived before their SID was saved: SID → (parameters, arrival).
    early_status: std::sync::Mutex<HashMap<String, EarlyStatus>>,
    /// Itself, for spawning work from `&self` methods.
    me: std::sync::OnceLock<std::sync::Weak<Messaging>>,
}

impl Messaging {
    pub async fn new(
        settings: Arc<Settings>,
        store: SqliteStore,
        endpoint: Endpoint,
        registrar: Arc<Registrar>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let mut by_token = HashMap::new();
        let mut tokens = Vec::new();
        for (i, sms) in settings.sms.iter().enumerate() {
            let token = store
                .webhook_token(sms.name.clone(), false, now_ms())
                .await?;
            by_token.insert(token.clone(), i);
            tokens.push(token);
        }
        let accounts = settings.sms.iter().map(Account::for_config).collect();
        let max_in_flight = settings.messaging.max_in_flight;
        let this = Arc::new(Self {
            twilio: TwilioClient::new(Duration::from_secs(15)),
            accounts,
            tokens: RwLock::new((by_token, tokens)),
            last_webhook: RwLock::default(),
            pacer: pacing::Pacer::default(),
            limits: outbound::Limits::default(),
            outbox_kick: Notify::new(),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            delivering: dashmap::DashSet::new(),
            redeliver: dashmap::DashSet::new(),
            inboxes: Arc::default(),
            me: std::sync::OnceLock::new(),
            early_status: std::sync::Mutex::default(),
            waiting: store
                .due_inbound_owners(i64::MAX)
                .await?
                .into_iter()
                .filter_map(|(e, t)| Owner::from_columns(e, t))
                .collect(),
            opt_outs: store.opt_outs().await?.into_iter().collect(),
            settings,
            store,
            endpoint,
            registrar,
            metrics,
        });
        let _ = this.me.set(Arc::downgrade(&this));
        Ok(this)
    }

    pub fn is_opted_out(&self, remote: &str, sender: &str) -> bool {
        self.opt_outs
            .contains(&(remote.to_string(), sender.to_string()))
    }

    /// Records an opt-out (or opt-in) in the store, then in memory.
    pub async fn set_opt_out(
        &self,
        remote: &str,
        sender: &str,
        opted_out: bool,
        now: i64,
    ) -> Result<(), crate::store::StoreError> {
        self.store
            .set_opt_out(remote.to_string(), sender.to_string(), opted_out, now)
            .await?;
        self.remember_opt_out(remote.to_string(), sender.to_string(), opted_out);
        Ok(())
    }

    /// The in-memory side of an opt-out already in the store.
    fn remember_opt_out(&self, remote: String, sender: String, opted_out: bool) {
        if opted_out {
            self.opt_outs.insert((remote, sender));
        } else {
            self.opt_outs.remove(&(remote, sender));
        }
    }

    fn sms_index(&self, name: &str) -> Option<usize> {
        self.settings.sms.iter().position(|s| s.name == name)
    }

    pub fn webhook_url(&self, index: usize) -> String {
        let tokens = self.tokens.read().expect("tokens lock");
        format!(
            "{}/twilio/sms/{}",
            self.settings.gateway.public_url, tokens.1[index]
        )
    }

    pub fn status_callback_url(&self, index: usize) -> String {
        let tokens = self.tokens.read().expect("tokens lock");
        format!(
            "{}/twilio/status/{}",
            self.settings.gateway.public_url, tokens.1[index]
        )
    }

    fn config_for_token(&self, token: &str) -> Option<usize> {
        self.tokens
            .read()
            .expect("tokens lock")
            .0
            .get(token)
            .copied()
    }

    /// Replaces a configuration's webhook token; the old URL stops working at once.
    pub async fn rotate_token(
        &self,
        name: &str,
    ) -> Result<Option<String>, crate::store::StoreError> {
        let Some(i) = self.sms_index(name) else {
            return Ok(None);
        };
        let token = self
            .store
            .webhook_token(name.to_string(), true, now_ms())
            .await?;
        let mut t = self.tokens.write().expect("tokens lock");
        let old = std::mem::replace(&mut t.1[i], token.clone());
        t.0.remove(&old);
        t.0.insert(token, i);
        drop(t);
        Ok(Some(self.webhook_url(i)))
    }

    pub fn last_webhook(&self, name: &str) -> Option<SystemTime> {
        self.last_webhook.read().expect("lock").get(name).copied()
    }

    fn count(&self, direction: Direction, status: MessageStatus) {
        self.metrics
            .messages
            .get_or_create(&MessageLabel {
                direction: direction.as_str(),
                status: status.as_str(),
            })
            .inc();
    }

    /// Queues a text (or IMDN) from smsgw itself to a phone or trunk. Notices are never answered
    /// with notices, so two gateways (or a gateway and an offline phone) cannot loop.
    async fn queue_notice(
        &self,
        owner: Owner,
        sms_config: &str,
        body: String,
        meta: serde_json::Value,
    ) {
        let now = now_ms();
        let (extension, trunk) = owner.columns();
        let notice = NewMessage {
            direction: Direction::Inbound,
            kind: Kind::Notice,
            sms_config: sms_config.to_string(),
            extension,
            trunk,
            remote: self.settings.gateway.system_sender.clone(),
            sender: String::new(),
            body,
            media: vec![],
            twilio_sid: None,
            status: MessageStatus::Pending,
            segments: 0,
            now,
            attempts: 0,
            next_attempt_at: Some(now),
            expires_at: Some(now + self.settings.messaging.inbox_ttl_secs as i64 * 1000),
            in_doubt: false,
            meta,
            lease: 0,
        };
        match self.store.insert_messages(vec![notice]).await {
            Ok(_) => self.inboxes.fall_back_to_store(&owner),
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "cannot queue a notice for a phone");
            }
        }
    }

    /// Refreshes the queue gauges.
    pub async fn refresh_gauges(&self) {
        if let Ok((outbox, inbox, oldest)) = self.store.queue_stats().await {
            self.metrics.outbox_pending.set(outbox as i64);
            self.metrics.inbox_pending.set(inbox as i64);
            let age = oldest.map_or(0, |t| ((now_ms() - t) / 1000).max(0));
            self.metrics.inbox_oldest_seconds.set(age);
        }
        for (sender, depth) in self.pacer.depths() {
            self.metrics
                .sender_queue
                .get_or_create(&crate::metrics::SenderLabel { sender })
                .set(depth as i64);
        }
    }
}

/// The text of a failure notice: "Not delivered to +1 555 123 4567: 30007 message filtered".
pub fn failure_text(m: &Message) -> String {
    let code = m.error_code.map_or_else(String::new, |c| format!("{c} "));
    let what = m
        .error_code
        .and_then(describe_error)
        .map(str::to_string)
        .or_else(|| m.error_message.clone())
        .unwrap_or_else(|| m.status.as_str().to_string());
    format!(
        "Not delivered to {}: {code}{what}",
        pretty_number(&m.remote)
    )
}

/// Plain words for the Twilio errors a phone user can act on.
pub fn describe_error(code: i64) -> Option<&'static str> {
    Some(match code {
        21211 => "invalid destination number",
        21212 | 21606 => "the sending number cannot send SMS",
        21408 => "sending to this country is not enabled",
        21610 => "the recipient has opted out (STOP)",
        21611 => "too many messages queued for this sender",
        21612 => "this destination cannot be reached by SMS",
        21614 => "the destination is not a mobile number",
        21617 => "the message is too long",
        30001 => "queue overflow",
        30003 => "the handset is unreachable",
        30004 => "message blocked",
        30005 => "unknown destination handset",
        30006 => "landline or unreachable carrier",
        30007 => "message filtered by the carrier",
        30008 => "unknown carrier error",
        30034 => "the sending number is not registered for A2P 10DLC",
        _ => return None,
    })
}

fn pretty_number(n: &str) -> String {
    let digits = n
        .strip_prefix("+1")
        .filter(|d| d.len() == 10 && d.bytes().all(|b| b.is_ascii_digit()));
    match digits {
        Some(d) => format!("+1 {} {} {}", &d[..3], &d[3..6], &d[6..]),
        None => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_notice_in_plain_words() {
        let mut m = Message::stored(1, NewMessage::sample(Direction::Outbound, 0));
        m.status = MessageStatus::Undelivered;
        m.error_code = Some(30007);
        assert_eq!(
            failure_text(&m),
            "Not delivered to +1 555 123 4567: 30007 message filtered by the carrier"
        );
        let mut other = m.clone();
        other.error_code = None;
        other.status = MessageStatus::Expired;
        other.remote = "+447911123456".into();
        assert_eq!(
            failure_text(&other),
            "Not delivered to +447911123456: expired"
        );
    }
}
