//! Prometheus metrics. Label values come from small fixed sets, so label cardinality (and
//! memory) stays bounded whatever peers send.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use smsgw_sip::Method;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabel {
    pub method: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlgorithmLabel {
    pub algorithm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabel {
    pub direction: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SenderLabel {
    /// Configured senders only (DIDs, sender ids, services), so the set is bounded.
    pub sender: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub sip_requests: Family<MethodLabel, Counter>,
    pub sip_responses: Family<ResponseLabel, Counter>,
    pub sip_malformed: Counter,
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub auth_successes: Family<AlgorithmLabel, Counter>,
    pub auth_blocked: Counter,
    pub registrations: Gauge,
    pub server_transactions: Gauge,
    pub tcp_connections: Gauge,
    pub store_errors: Counter,
    pub messages: Family<MessageLabel, Counter>,
    pub twilio_latency: Histogram,
    pub twilio_retries: Counter,
    pub twilio_errors: Family<CodeLabel, Counter>,
    pub sender_queue: Family<SenderLabel, Gauge>,
    pub webhooks: Family<OutcomeLabel, Counter>,
    pub deliveries: Family<CodeLabel, Counter>,
    pub inbox_pending: Gauge,
    pub inbox_oldest_seconds: Gauge,
    pub outbox_pending: Gauge,
}

/// The method as a metric label: known methods by name, anything else as "other".
pub fn method_label(method: &Method) -> &'static str {
    match method {
        Method::Register => "REGISTER",
        Method::Options => "OPTIONS",
        Method::Message => "MESSAGE",
        Method::Invite => "INVITE",
        Method::Ack => "ACK",
        Method::Bye => "BYE",
        Method::Cancel => "CANCEL",
        Method::Other(_) => "other",
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("smsgw");
        let m = Self {
            sip_requests: Family::default(),
            sip_responses: Family::default(),
            sip_malformed: Counter::default(),
            auth_failures: Family::default(),
            auth_successes: Family::default(),
            auth_blocked: Counter::default(),
            registrations: Gauge::default(),
            server_transactions: Gauge::default(),
            tcp_connections: Gauge::default(),
            store_errors: Counter::default(),
            messages: Family::default(),
            twilio_latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            twilio_retries: Counter::default(),
            twilio_errors: Family::default(),
            sender_queue: Family::default(),
            webhooks: Family::default(),
            deliveries: Family::default(),
            inbox_pending: Gauge::default(),
            inbox_oldest_seconds: Gauge::default(),
            outbox_pending: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sip_requests",
            "SIP requests received, by method",
            m.sip_requests.clone(),
        );
        registry.register(
            "sip_responses",
            "SIP final responses sent, by request method and status code",
            m.sip_responses.clone(),
        );
        registry.register(
            "sip_malformed",
            "SIP messages refused as malformed before reaching a handler",
            m.sip_malformed.clone(),
        );
        registry.register(
            "sip_auth_failures",
            "Failed digest authentications, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "sip_auth_successes",
            "Successful digest authentications, by algorithm (shows when MD5 can be switched off)",
            m.auth_successes.clone(),
        );
        registry.register(
            "sip_auth_blocked",
            "Requests refused because their source address is blocked after failed authentications",
            m.auth_blocked.clone(),
        );
        registry.register(
            "registrations",
            "Registered contacts (bindings)",
            m.registrations.clone(),
        );
        registry.register(
            "sip_server_transactions",
            "Server transactions remembered for retransmissions",
            m.server_transactions.clone(),
        );
        registry.register(
            "sip_tcp_connections",
            "Open SIP TCP connections",
            m.tcp_connections.clone(),
        );
        registry.register(
            "store_errors",
            "Failed store operations",
            m.store_errors.clone(),
        );
        registry.register(
            "messages",
            "Message status changes, by direction and new status",
            m.messages.clone(),
        );
        registry.register(
            "twilio_request_seconds",
            "Latency of Twilio Messages API requests",
            m.twilio_latency.clone(),
        );
        registry.register(
            "twilio_retries",
            "Sends to Twilio that will be retried",
            m.twilio_retries.clone(),
        );
        registry.register(
            "twilio_errors",
            "Errors from Twilio, by Twilio error code",
            m.twilio_errors.clone(),
        );
        registry.register(
            "sender_queue",
            "Messages waiting for their sender's pacing, by sender",
            m.sender_queue.clone(),
        );
        registry.register(
            "webhooks",
            "Inbound webhooks, by outcome",
            m.webhooks.clone(),
        );
        registry.register(
            "sip_deliveries",
            "MESSAGE deliveries to phones and trunks, by SIP status (0: no answer)",
            m.deliveries.clone(),
        );
        registry.register(
            "inbox_pending",
            "Inbound messages waiting for delivery (store-and-forward)",
            m.inbox_pending.clone(),
        );
        registry.register(
            "inbox_oldest_seconds",
            "Age of the oldest inbound message waiting",
            m.inbox_oldest_seconds.clone(),
        );
        registry.register(
            "outbox_pending",
            "Outbound messages waiting to be sent or retried",
            m.outbox_pending.clone(),
        );
        Self { registry, ..m }
    }

    /// Sends a SIP final response and counts it by method and status.
    pub fn respond(&self, tx: smsgw_sip::ServerTx, resp: smsgw_sip::Response) {
        self.sip_responses
            .get_or_create(&ResponseLabel {
                method: method_label(&tx.request.method),
                code: resp.code,
            })
            .inc();
        tx.respond(resp);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
