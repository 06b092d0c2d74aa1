//! Prometheus metrics. Label values come from small fixed sets, so label cardinality (and
//! memory) stays bounded whatever peers send.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
        Self { registry, ..m }
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
