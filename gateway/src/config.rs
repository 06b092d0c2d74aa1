//! Configuration: one TOML file, every key overridable as `SMSGW__SECTION__KEY`, validated into
//! [`Settings`] with *every* problem reported against the key that caused it.

use ipnet::IpNet;
use serde::Deserialize;
use smsgw_rules::{CountryCode, ExtensionId, SenderId, E164};
use smsgw_sip::uri::SipUri;
use smsgw_sip::Transport;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Every problem found, in file order as far as validation can tell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "the configuration has {} problem(s):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

/// A secret value; never shown by Debug or Display.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

// ---- The file's shape --------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct RawConfig {
    gateway: RawGateway,
    #[serde(default)]
    sip: RawSip,
    http: RawHttp,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    extensions: Vec<RawExtension>,
    #[serde(default)]
    trunks: Vec<RawTrunk>,
    #[serde(default)]
    sms: Vec<RawSms>,
    #[serde(default)]
    messaging: RawMessaging,
    #[serde(default)]
    outbound_rules: Vec<RawOutboundRule>,
    #[serde(default)]
    inbound_rules: Vec<RawInboundRule>,
    #[serde(default)]
    simulator: Option<RawSimulator>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawMessaging {
    answer: String,
    answer_window_ms: u64,
    long_body: String,
    max_media_bytes: usize,
    media_ttl_secs: u64,
    inbox_ttl_secs: u64,
    inbox_retry_secs: u64,
    max_pending_per_extension: u64,
    reply_window_days: u64,
    rate_per_minute: u32,
    daily_quota: u32,
    max_in_flight: usize,
    retry_max_secs: u64,
}

impl Default for RawMessaging {
    fn default() -> Self {
        Self {
            answer: "after_twilio".into(),
            answer_window_ms: 4000,
            long_body: "split".into(),
            max_media_bytes: 5 * 1024 * 1024,
            media_ttl_secs: 7 * 86_400,
            inbox_ttl_secs: 7 * 86_400,
            inbox_retry_secs: 60,
            max_pending_per_extension: 1000,
            reply_window_days: 30,
            rate_per_minute: 60,
            daily_quota: 1000,
            max_in_flight: 10_000,
            retry_max_secs: 300,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawOutboundRule {
    name: String,
    #[serde(default)]
    from: Vec<String>,
    to: String,
    rewrite: String,
    sms: String,
    #[serde(default = "default_sender")]
    sender: String,
}

fn default_sender() -> String {
    "extension".into()
}

#[derive(Debug, Deserialize)]
struct RawInboundRule {
    name: String,
    #[serde(default)]
    did: Vec<String>,
    #[serde(default)]
    from: String,
    #[serde(default)]
    sms: String,
    to: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RawSimulator {
    listen: String,
    #[serde(default = "default_callback_delay")]
    callback_delay_ms: u64,
}

fn default_callback_delay() -> u64 {
    200
}

#[derive(Debug, Deserialize)]
struct RawGateway {
    domain: String,
    public_url: String,
    data_dir: String,
    #[serde(default = "default_grace")]
    shutdown_grace_secs: u64,
    #[serde(default = "default_system_sender")]
    system_sender: String,
}

fn default_system_sender() -> String {
    "smsgw".into()
}

fn default_grace() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawSip {
    listen: Vec<String>,
    min_expires: u32,
    max_expires: u32,
    default_expires: u32,
    max_contacts_per_extension: usize,
    digest_md5_only: bool,
    nonce_lifetime_secs: u64,
    auth_max_failures: u32,
    auth_failure_window_secs: u64,
    auth_block_secs: u64,
    max_tcp_connections: usize,
    max_message_bytes: usize,
    udp_workers: usize,
}

impl Default for RawSip {
    fn default() -> Self {
        Self {
            listen: vec!["udp:0.0.0.0:5060".into(), "tcp:0.0.0.0:5060".into()],
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            max_contacts_per_extension: 10,
            digest_md5_only: false,
            nonce_lifetime_secs: 300,
            auth_max_failures: 10,
            auth_failure_window_secs: 60,
            auth_block_secs: 300,
            max_tcp_connections: 10_000,
            max_message_bytes: 1024 * 1024,
            udp_workers: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawHttp {
    webhook_listen: String,
    admin_listen: String,
    admin_token: String,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawExtension {
    id: String,
    password: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    dids: Vec<String>,
    #[serde(default)]
    answer: Option<String>,
    #[serde(default)]
    rate_per_minute: Option<u32>,
    #[serde(default)]
    daily_quota: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RawTrunk {
    name: String,
    #[serde(default)]
    allow: Vec<String>,
    uri: String,
    #[serde(default)]
    answer: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawSms {
    name: String,
    account_sid: String,
    #[serde(default)]
    auth_token: Option<String>,
    #[serde(default)]
    api_key_sid: Option<String>,
    #[serde(default)]
    api_key_secret: Option<String>,
    #[serde(default)]
    dids: Vec<String>,
    #[serde(default)]
    sender_id: String,
    #[serde(default)]
    messaging_service_sid: String,
    #[serde(default)]
    allowed_countries: Vec<String>,
    #[serde(default = "default_api_base")]
    api_base: String,
    #[serde(default = "default_mps")]
    messages_per_second: f64,
    #[serde(default)]
    validity_period: Option<u32>,
    #[serde(default)]
    provide_feedback: bool,
    #[serde(default)]
    application_sid: String,
    #[serde(default)]
    smart_encoded: bool,
    #[serde(default)]
    shorten_urls: bool,
    #[serde(default)]
    help_reply: String,
}

fn default_mps() -> f64 {
    1.0
}

fn default_api_base() -> String {
    "https://api.twilio.com".into()
}

// ---- Validated settings ------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: GatewaySettings,
    pub sip: SipSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub extensions: Vec<Extension>,
    pub trunks: Vec<Trunk>,
    pub sms: Vec<SmsConfig>,
    pub messaging: MessagingSettings,
    pub outbound_rules: Vec<OutboundRule>,
    pub inbound_rules: Vec<InboundRule>,
    pub simulator: Option<SimulatorSettings>,
}

/// When a MESSAGE from a phone or trunk is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerMode {
    /// 202 as soon as the message is committed to the outbox.
    OnStore,
    /// After Twilio's answer, within `answer_window` (then 202 and the outbox carries on).
    AfterTwilio,
}

impl AnswerMode {
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "on_store" => Ok(Self::OnStore),
            "after_twilio" => Ok(Self::AfterTwilio),
            other => Err(format!("{other:?} is not \"on_store\" or \"after_twilio\"")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MessagingSettings {
    pub answer: AnswerMode,
    pub answer_window: std::time::Duration,
    /// Split bodies over 1600 characters (true) or refuse them with 413.
    pub split_long_bodies: bool,
    pub max_media_bytes: usize,
    pub media_ttl_secs: u64,
    pub inbox_ttl_secs: u64,
    pub inbox_retry_secs: u64,
    pub max_pending_per_extension: u64,
    pub reply_window_days: u64,
    pub rate_per_minute: u32,
    pub daily_quota: u32,
    pub max_in_flight: usize,
    pub retry_max_secs: u64,
}

#[derive(Debug, Clone)]
pub struct SimulatorSettings {
    pub listen: SocketAddr,
    pub callback_delay: std::time::Duration,
}

pub use smsgw_rules::inbound::InboundRule;
pub use smsgw_rules::outbound::OutboundRule;

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub domain: String,
    /// Without a trailing slash.
    pub public_url: String,
    pub data_dir: PathBuf,
    pub shutdown_grace: std::time::Duration,
    /// The user part notices to phones come from.
    pub system_sender: String,
}

#[derive(Debug, Clone)]
pub struct SipSettings {
    pub listen: Vec<(Transport, SocketAddr)>,
    pub min_expires: u32,
    pub max_expires: u32,
    pub default_expires: u32,
    pub max_contacts_per_extension: usize,
    pub digest_md5_only: bool,
    pub nonce_lifetime_secs: u64,
    pub auth_max_failures: u32,
    pub auth_failure_window_secs: u64,
    pub auth_block_secs: u64,
    pub max_tcp_connections: usize,
    pub max_message_bytes: usize,
    pub udp_workers: usize,
}

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub webhook_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct Extension {
    pub id: ExtensionId,
    pub password: Secret,
    pub name: String,
    pub dids: Vec<E164>,
    pub answer: Option<AnswerMode>,
    pub rate_per_minute: Option<u32>,
    pub daily_quota: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Trunk {
    pub name: String,
    pub allow: Vec<IpNet>,
    pub uri: String,
    pub answer: Option<AnswerMode>,
}

#[derive(Debug, Clone)]
pub enum TwilioAuth {
    AuthToken,
    ApiKey { sid: String, secret: Secret },
}

#[derive(Debug, Clone)]
pub struct SmsConfig {
    pub name: String,
    pub account_sid: String,
    /// Also the key that signs Twilio's webhooks, so it is required even with an API key.
    pub auth_token: Secret,
    pub auth: TwilioAuth,
    pub dids: Vec<E164>,
    pub sender_id: Option<SenderId>,
    pub messaging_service_sid: Option<String>,
    pub allowed_countries: Vec<CountryCode>,
    pub api_base: String,
    /// Pacing per sender, in segments per second.
    pub messages_per_second: f64,
    /// Extra parameters sent with every message (ValidityPeriod, ProvideFeedback, …).
    pub send_params: Vec<(String, String)>,
    pub validity_secs: u32,
    pub help_reply: Option<String>,
}

// ---- Loading -----------------------------------------------------------------------------

/// Reads `path` and the `SMSGW__…` environment, then validates.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let env = std::env::vars().filter(|(k, _)| k.starts_with("SMSGW__"));
    load_with_env(path, env.collect())
}

/// [`load`] with an explicit environment (tests must not touch the process's).
pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<Settings, ConfigError> {
    let single = |key: &str, message: String| ConfigError {
        problems: vec![Problem {
            key: key.into(),
            message,
        }],
    };
    if !path.is_file() {
        return Err(single(
            "--config",
            format!("{} does not exist or is not a file", path.display()),
        ));
    }
    let built = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("SMSGW")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("sip.listen")
                .with_list_parse_key("sms.allowed_countries")
                .source(Some(env)),
        )
        .build()
        .map_err(|e| single(&path.display().to_string(), e.to_string()))?;
    let mut unknown = Vec::new();
    let mut on_unknown = |p: serde_ignored::Path<'_>| unknown.push(key_of(&p));
    let raw: Result<RawConfig, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(built, &mut on_unknown));
    let mut problems: Vec<Problem> = unknown
        .into_iter()
        .map(|key| Problem {
            key,
            message: "unknown key (check the spelling; see conf/ for every key)".into(),
        })
        .collect();
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) => {
            let key = e.path().to_string();
            let message = e.into_inner().to_string();
            problems.push(Problem { key, message });
            return Err(ConfigError { problems });
        }
    };
    let settings = validate(raw, &mut problems);
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigError { problems })
    }
}

/// `sms[0].dids` style, the same as validation uses.
fn key_of(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_of(parent)),
        Path::Map { parent, key } => match key_of(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_of(parent),
    }
}

struct Collector<'a>(&'a mut Vec<Problem>);

impl Collector<'_> {
    fn push(&mut self, key: impl Into<String>, message: impl fmt::Display) {
        self.0.push(Problem {
            key: key.into(),
            message: message.to_string(),
        });
    }

    fn check<T, E: fmt::Display>(&mut self, key: impl Into<String>, r: Result<T, E>) -> Option<T> {
        r.map_err(|e| self.push(key, e)).ok()
    }

    /// Resolves inline, `env:NAME` or `file:PATH` secrets.
    fn secret(&mut self, key: String, raw: &str) -> Secret {
        let value = if let Some(name) = raw.strip_prefix("env:") {
            match std::env::var(name) {
                Ok(v) => v,
                Err(_) => {
                    self.push(key, format!("environment variable {name} is not set"));
                    return Secret::new("");
                }
            }
        } else if let Some(file) = raw.strip_prefix("file:") {
            match std::fs::read_to_string(file) {
                Ok(v) => v.trim_end_matches(['\r', '\n']).to_string(),
                Err(e) => {
                    self.push(key, format!("cannot read {file}: {e}"));
                    return Secret::new("");
                }
            }
        } else {
            raw.to_string()
        };
        if value.is_empty() {
            self.push(key, "is empty");
        }
        Secret::new(value)
    }
}

fn parse_listen(value: &str) -> Result<(Transport, SocketAddr), String> {
    let (proto, addr) = value.split_once(':').ok_or_else(|| {
        format!("{value:?} must look like \"udp:0.0.0.0:5060\" or \"tcp:[::]:5060\"")
    })?;
    let transport = match proto {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        "tls" | "ws" | "wss" => {
            return Err(format!(
                "transport {proto:?} is not supported yet (use udp or tcp)"
            ))
        }
        other => return Err(format!("unknown transport {other:?} (use udp or tcp)")),
    };
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address with a port"))?;
    Ok((transport, addr))
}

fn parse_http_url(value: &str) -> Result<String, String> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| format!("{value:?} must start with https:// or http://"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{value:?} has no host"));
    }
    http::Uri::try_from(value).map_err(|e| format!("{value:?} is not a valid URL: {e}"))?;
    Ok(value.trim_end_matches('/').to_string())
}

/// `AC`, `MG` or `SK` followed by 32 lowercase or uppercase hex digits.
fn check_sid(value: &str, prefix: &str) -> Result<String, String> {
    let ok = value.len() == 34
        && value.starts_with(prefix)
        && value[2..].bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{value:?} is not a valid SID: expected {prefix} followed by 32 hex digits"
        ))
    }
}

fn validate(raw: RawConfig, problems: &mut Vec<Problem>) -> Settings {
    let mut c = Collector(problems);
    let g = &raw.gateway;
    let domain_ok = !g.domain.is_empty()
        && g.domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !domain_ok {
        c.push(
            "gateway.domain",
            "must be a host name or IP address (letters, digits, '.', '-', ':')",
        );
    }
    if g.shutdown_grace_secs == 0 {
        c.push(
            "gateway.shutdown_grace_secs",
            "must be at least 1 (in-flight work is saved in that time)",
        );
    }
    let public_url = c
        .check("gateway.public_url", parse_http_url(&g.public_url))
        .unwrap_or_default();
    if g.data_dir.trim().is_empty() {
        c.push("gateway.data_dir", "is empty");
    }

    let s = &raw.sip;
    if s.listen.is_empty() {
        c.push("sip.listen", "needs at least one address");
    }
    let listen: Vec<_> = s
        .listen
        .iter()
        .enumerate()
        .filter_map(|(i, l)| c.check(format!("sip.listen[{i}]"), parse_listen(l)))
        .collect();
    if s.min_expires == 0 || s.min_expires > s.default_expires || s.default_expires > s.max_expires
    {
        c.push(
            "sip.default_expires",
            format!(
                "need 0 < min_expires ({}) <= default_expires ({}) <= max_expires ({})",
                s.min_expires, s.default_expires, s.max_expires
            ),
        );
    }
    for (key, value) in [
        ("sip.nonce_lifetime_secs", s.nonce_lifetime_secs),
        ("sip.auth_max_failures", s.auth_max_failures.into()),
        ("sip.auth_failure_window_secs", s.auth_failure_window_secs),
        (
            "sip.max_contacts_per_extension",
            s.max_contacts_per_extension as u64,
        ),
        ("sip.max_tcp_connections", s.max_tcp_connections as u64),
    ] {
        if value == 0 {
            c.push(key, "must be greater than 0");
        }
    }
    if !(1300..=64 * 1024 * 1024).contains(&s.max_message_bytes) {
        c.push(
            "sip.max_message_bytes",
            "must be between 1300 (RFC 3428 §8) and 67108864",
        );
    }
    if s.udp_workers > 64 {
        c.push("sip.udp_workers", "must be at most 64 (0 = one per core)");
    }

    let h = &raw.http;
    let webhook_listen = c.check(
        "http.webhook_listen",
        h.webhook_listen
            .parse::<SocketAddr>()
            .map_err(|_| format!("{:?} is not an IP address with a port", h.webhook_listen)),
    );
    let admin_listen = c.check(
        "http.admin_listen",
        h.admin_listen
            .parse::<SocketAddr>()
            .map_err(|_| format!("{:?} is not an IP address with a port", h.admin_listen)),
    );
    let admin_token = c.secret("http.admin_token".into(), &h.admin_token);

    let format = match raw.log.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            c.push(
                "log.format",
                format!("{other:?} is not \"text\" or \"json\""),
            );
            LogFormat::Text
        }
    };

    let mut ids = HashMap::new();
    let mut did_owner: HashMap<E164, String> = HashMap::new();
    let mut extensions = Vec::new();
    for (i, e) in raw.extensions.iter().enumerate() {
        let key = |k: &str| format!("extensions[{i}].{k}");
        let id = c.check(key("id"), ExtensionId::parse(&e.id));
        if let Some(first) = ids.insert(e.id.clone(), i) {
            c.push(
                key("id"),
                format!("{:?} is also extensions[{first}].id", e.id),
            );
        }
        let password = c.secret(key("password"), &e.password);
        let mut dids = Vec::new();
        for (j, d) in e.dids.iter().enumerate() {
            let Some(did) = c.check(format!("{}[{j}]", key("dids")), E164::parse(d)) else {
                continue;
            };
            if let Some(owner) = did_owner.insert(did.clone(), key("dids")) {
                c.push(
                    format!("{}[{j}]", key("dids")),
                    format!("{did} is also in {owner}"),
                );
            }
            dids.push(did);
        }
        if let Some(id) = id {
            let answer = e
                .answer
                .as_deref()
                .and_then(|a| c.check(key("answer"), AnswerMode::parse(a)));
            extensions.push(Extension {
                id,
                password,
                name: e.name.clone(),
                dids,
                answer,
                rate_per_minute: e.rate_per_minute,
                daily_quota: e.daily_quota,
            });
        }
    }

    let mut names = HashMap::new();
    let mut trunks = Vec::new();
    for (i, t) in raw.trunks.iter().enumerate() {
        let key = |k: &str| format!("trunks[{i}].{k}");
        if t.name.is_empty() {
            c.push(key("name"), "is empty");
        }
        if let Some(first) = names.insert(t.name.clone(), i) {
            c.push(
                key("name"),
                format!("{:?} is also trunks[{first}].name", t.name),
            );
        }
        if t.allow.is_empty() {
            c.push(
                key("allow"),
                "needs at least one address or network (e.g. \"10.0.0.0/24\")",
            );
        }
        let allow = t
            .allow
            .iter()
            .enumerate()
            .filter_map(|(j, a)| {
                let parsed = a
                    .parse::<IpNet>()
                    .or_else(|_| a.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{a:?} is not an IP address or network"));
                c.check(format!("{}[{j}]", key("allow")), parsed)
            })
            .collect();
        match SipUri::parse(&t.uri) {
            Some(u) if !u.host.is_empty() => {}
            _ => c.push(
                key("uri"),
                format!(
                    "{:?} is not a sip: URI such as \"sip:10.0.0.5:5060\"",
                    t.uri
                ),
            ),
        }
        let answer = t
            .answer
            .as_deref()
            .and_then(|a| c.check(key("answer"), AnswerMode::parse(a)));
        trunks.push(Trunk {
            name: t.name.clone(),
            allow,
            uri: t.uri.clone(),
            answer,
        });
    }

    let mut sms_names = HashMap::new();
    let mut sms_did_owner: HashMap<E164, String> = HashMap::new();
    let mut sms = Vec::new();
    for (i, m) in raw.sms.iter().enumerate() {
        let key = |k: &str| format!("sms[{i}].{k}");
        if m.name.is_empty() {
            c.push(key("name"), "is empty");
        }
        if let Some(first) = sms_names.insert(m.name.clone(), i) {
            c.push(
                key("name"),
                format!("{:?} is also sms[{first}].name", m.name),
            );
        }
        let account_sid = c
            .check(key("account_sid"), check_sid(&m.account_sid, "AC"))
            .unwrap_or_default();
        let auth_token = match &m.auth_token {
            Some(t) => c.secret(key("auth_token"), t),
            None => {
                c.push(
                    key("auth_token"),
                    "is required (it also validates Twilio's webhook signatures)",
                );
                Secret::new("")
            }
        };
        let auth = match (&m.api_key_sid, &m.api_key_secret) {
            (None, None) => TwilioAuth::AuthToken,
            (Some(sid), Some(secret)) => TwilioAuth::ApiKey {
                sid: c
                    .check(key("api_key_sid"), check_sid(sid, "SK"))
                    .unwrap_or_default(),
                secret: c.secret(key("api_key_secret"), secret),
            },
            (Some(_), None) => {
                c.push(key("api_key_secret"), "is required with api_key_sid");
                TwilioAuth::AuthToken
            }
            (None, Some(_)) => {
                c.push(key("api_key_sid"), "is required with api_key_secret");
                TwilioAuth::AuthToken
            }
        };
        let mut dids = Vec::new();
        for (j, d) in m.dids.iter().enumerate() {
            let k = format!("{}[{j}]", key("dids"));
            let Some(did) = c.check(k.clone(), E164::parse(d)) else {
                continue;
            };
            if let Some(owner) = sms_did_owner.insert(did.clone(), key("dids")) {
                c.push(k, format!("{did} is also in {owner}"));
            }
            dids.push(did);
        }
        let sender_id = (!m.sender_id.is_empty())
            .then(|| c.check(key("sender_id"), SenderId::parse(&m.sender_id)))
            .flatten();
        let messaging_service_sid = (!m.messaging_service_sid.is_empty())
            .then(|| {
                c.check(
                    key("messaging_service_sid"),
                    check_sid(&m.messaging_service_sid, "MG"),
                )
            })
            .flatten();
        let allowed_countries = m
            .allowed_countries
            .iter()
            .enumerate()
            .filter_map(|(j, cc)| {
                c.check(
                    format!("{}[{j}]", key("allowed_countries")),
                    CountryCode::parse(cc),
                )
            })
            .collect();
        let api_base = c
            .check(key("api_base"), parse_http_url(&m.api_base))
            .unwrap_or_default();
        if !(m.messages_per_second > 0.0 && m.messages_per_second <= 1_000_000.0) {
            c.push(
                key("messages_per_second"),
                "must be above 0 and at most 1000000",
            );
        }
        let validity_secs = m.validity_period.unwrap_or(36_000);
        if !(1..=36_000).contains(&validity_secs) {
            c.push(
                key("validity_period"),
                "must be 1 to 36000 seconds (Twilio's ValidityPeriod)",
            );
        }
        let mut send_params = Vec::new();
        if let Some(v) = m.validity_period {
            send_params.push(("ValidityPeriod".to_string(), v.to_string()));
        }
        for (name, on) in [
            ("ProvideFeedback", m.provide_feedback),
            ("SmartEncoded", m.smart_encoded),
            ("ShortenUrls", m.shorten_urls),
        ] {
            if on {
                send_params.push((name.to_string(), "true".to_string()));
            }
        }
        if m.shorten_urls && m.messaging_service_sid.is_empty() {
            c.push(
                key("shorten_urls"),
                "needs messaging_service_sid (Twilio shortens links only for Messaging Services)",
            );
        }
        if !m.application_sid.is_empty() {
            let sid = c.check(key("application_sid"), check_sid(&m.application_sid, "AP"));
            send_params.extend(sid.map(|s| ("ApplicationSid".to_string(), s)));
        }
        sms.push(SmsConfig {
            name: m.name.clone(),
            account_sid,
            auth_token,
            auth,
            dids,
            sender_id,
            messaging_service_sid,
            allowed_countries,
            api_base,
            messages_per_second: m.messages_per_second,
            send_params,
            validity_secs,
            help_reply: (!m.help_reply.is_empty()).then(|| m.help_reply.clone()),
        });
    }

    let messaging = validate_messaging(&raw.messaging, &mut c);
    let outbound_rules =
        validate_outbound_rules(&raw.outbound_rules, &extensions, &trunks, &sms, &mut c);
    let inbound_rules =
        validate_inbound_rules(&raw.inbound_rules, &extensions, &trunks, &sms, &mut c);
    let simulator = raw.simulator.as_ref().and_then(|sim| {
        if sms.is_empty() {
            c.push(
                "simulator",
                "needs an [[sms]] configuration whose credentials and DIDs it serves",
            );
        }
        let listen = c.check(
            "simulator.listen",
            sim.listen
                .parse::<SocketAddr>()
                .map_err(|_| format!("{:?} is not an IP address with a port", sim.listen)),
        )?;
        Some(SimulatorSettings {
            listen,
            callback_delay: std::time::Duration::from_millis(sim.callback_delay_ms),
        })
    });
    let unspecified: SocketAddr = "0.0.0.0:0".parse().expect("literal");
    Settings {
        gateway: GatewaySettings {
            domain: g.domain.clone(),
            public_url,
            data_dir: PathBuf::from(&g.data_dir),
            shutdown_grace: std::time::Duration::from_secs(g.shutdown_grace_secs),
            system_sender: g.system_sender.clone(),
        },
        sip: SipSettings {
            listen,
            min_expires: s.min_expires,
            max_expires: s.max_expires,
            default_expires: s.default_expires,
            max_contacts_per_extension: s.max_contacts_per_extension,
            digest_md5_only: s.digest_md5_only,
            nonce_lifetime_secs: s.nonce_lifetime_secs,
            auth_max_failures: s.auth_max_failures,
            auth_failure_window_secs: s.auth_failure_window_secs,
            auth_block_secs: s.auth_block_secs,
            max_tcp_connections: s.max_tcp_connections,
            max_message_bytes: s.max_message_bytes,
            udp_workers: s.udp_workers,
        },
        http: HttpSettings {
            webhook_listen: webhook_listen.unwrap_or(unspecified),
            admin_listen: admin_listen.unwrap_or(unspecified),
            admin_token,
        },
        log: LogSettings {
            format,
            level: raw.log.level,
        },
        extensions,
        trunks,
        sms,
        messaging,
        outbound_rules,
        inbound_rules,
        simulator,
    }
}

fn validate_messaging(m: &RawMessaging, c: &mut Collector<'_>) -> MessagingSettings {
    let answer = c
        .check("messaging.answer", AnswerMode::parse(&m.answer))
        .unwrap_or(AnswerMode::AfterTwilio);
    if !(100..=30_000).contains(&m.answer_window_ms) {
        c.push(
            "messaging.answer_window_ms",
            "must be 100 to 30000 (keep it below Timer F, 32 s; 4000 suits most phones)",
        );
    }
    let split_long_bodies = match m.long_body.as_str() {
        "split" => true,
        "refuse" => false,
        other => {
            c.push(
                "messaging.long_body",
                format!("{other:?} is not \"split\" or \"refuse\""),
            );
            true
        }
    };
    for (key, value) in [
        ("messaging.inbox_ttl_secs", m.inbox_ttl_secs),
        ("messaging.inbox_retry_secs", m.inbox_retry_secs),
        ("messaging.media_ttl_secs", m.media_ttl_secs),
        (
            "messaging.max_pending_per_extension",
            m.max_pending_per_extension,
        ),
        ("messaging.max_in_flight", m.max_in_flight as u64),
        ("messaging.retry_max_secs", m.retry_max_secs),
        ("messaging.max_media_bytes", m.max_media_bytes as u64),
    ] {
        if value == 0 {
            c.push(key, "must be greater than 0");
        }
    }
    MessagingSettings {
        answer,
        answer_window: std::time::Duration::from_millis(m.answer_window_ms),
        split_long_bodies,
        max_media_bytes: m.max_media_bytes,
        media_ttl_secs: m.media_ttl_secs,
        inbox_ttl_secs: m.inbox_ttl_secs,
        inbox_retry_secs: m.inbox_retry_secs,
        max_pending_per_extension: m.max_pending_per_extension,
        reply_window_days: m.reply_window_days,
        rate_per_minute: m.rate_per_minute,
        daily_quota: m.daily_quota,
        max_in_flight: m.max_in_flight,
        retry_max_secs: m.retry_max_secs,
    }
}

fn validate_outbound_rules(
    raw: &[RawOutboundRule],
    extensions: &[Extension],
    trunks: &[Trunk],
    sms: &[SmsConfig],
    c: &mut Collector<'_>,
) -> Vec<OutboundRule> {
    use smsgw_rules::outbound::{SenderChoice, SourcePattern};
    let mut rules = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = |k: &str| format!("outbound_rules[{i}].{k}");
        if r.name.is_empty() {
            c.push(key("name"), "is empty");
        }
        let mut from = Vec::new();
        for (j, f) in r.from.iter().enumerate() {
            let Some(pattern) = c.check(format!("{}[{j}]", key("from")), SourcePattern::parse(f))
            else {
                continue;
            };
            match &pattern {
                SourcePattern::Trunk(t) if !trunks.iter().any(|x| &x.name == t) => c.push(
                    format!("{}[{j}]", key("from")),
                    format!("there is no trunk named {t:?}"),
                ),
                SourcePattern::Extension(e) if !extensions.iter().any(|x| x.id == *e) => c.push(
                    format!("{}[{j}]", key("from")),
                    format!("there is no extension {e}"),
                ),
                _ => {}
            }
            from.push(pattern);
        }
        let to = c.check(
            key("to"),
            regex::Regex::new(&r.to).map_err(|e| format!("not a valid pattern: {e}")),
        );
        let config = sms.iter().find(|s| s.name == r.sms);
        if config.is_none() {
            c.push(key("sms"), format!("there is no [[sms]] named {:?}", r.sms));
        }
        let sender = c.check(key("sender"), SenderChoice::parse(&r.sender));
        if let (Some(sender), Some(config)) = (&sender, config) {
            let problem = match sender {
                SenderChoice::Did(d) if !config.dids.contains(d) => {
                    Some(format!("{d} is not one of sms {:?}'s dids", config.name))
                }
                SenderChoice::SenderId if config.sender_id.is_none() => {
                    Some(format!("sms {:?} has no sender_id", config.name))
                }
                SenderChoice::MessagingService if config.messaging_service_sid.is_none() => Some(
                    format!("sms {:?} has no messaging_service_sid", config.name),
                ),
                _ => None,
            };
            if let Some(p) = problem {
                c.push(key("sender"), p);
            }
        }
        if let (Some(to), Some(sender)) = (to, sender) {
            rules.push(OutboundRule {
                name: r.name.clone(),
                from,
                to,
                rewrite: r.rewrite.clone(),
                sms: r.sms.clone(),
                sender,
            });
        }
    }
    rules
}

fn validate_inbound_rules(
    raw: &[RawInboundRule],
    extensions: &[Extension],
    trunks: &[Trunk],
    sms: &[SmsConfig],
    c: &mut Collector<'_>,
) -> Vec<InboundRule> {
    use smsgw_rules::inbound::{DidPattern, Target};
    let mut rules = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = |k: &str| format!("inbound_rules[{i}].{k}");
        if r.name.is_empty() {
            c.push(key("name"), "is empty");
        }
        let did = r
            .did
            .iter()
            .enumerate()
            .filter_map(|(j, d)| c.check(format!("{}[{j}]", key("did")), DidPattern::parse(d)))
            .collect();
        let from = (!r.from.is_empty())
            .then(|| {
                c.check(
                    key("from"),
                    regex::Regex::new(&r.from).map_err(|e| format!("not a valid pattern: {e}")),
                )
            })
            .flatten();
        if !r.sms.is_empty() && !sms.iter().any(|s| s.name == r.sms) {
            c.push(key("sms"), format!("there is no [[sms]] named {:?}", r.sms));
        }
        if r.to.is_empty() {
            c.push(key("to"), "needs at least one target (an extension, \"trunk:NAME\", \"forward:+…\" or \"drop\")");
        }
        let mut to = Vec::new();
        for (j, t) in r.to.iter().enumerate() {
            let k = format!("{}[{j}]", key("to"));
            let Some(target) = c.check(k.clone(), Target::parse(t)) else {
                continue;
            };
            match &target {
                Target::Extension(e) if !extensions.iter().any(|x| x.id == *e) => {
                    c.push(k, format!("there is no extension {e}"))
                }
                Target::Trunk(n) if !trunks.iter().any(|x| &x.name == n) => {
                    c.push(k, format!("there is no trunk named {n:?}"))
                }
                _ => {}
            }
            to.push(target);
        }
        rules.push(InboundRule {
            name: r.name.clone(),
            did,
            from,
            sms: (!r.sms.is_empty()).then(|| r.sms.clone()),
            to,
        });
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn write(text: &str) -> tempfile_lite::TempFile {
        tempfile_lite::TempFile::with(text)
    }

    /// A tiny temp-file helper so tests need no extra crate.
    mod tempfile_lite {
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn with(text: &str) -> Self {
                let path = std::env::temp_dir().join(format!(
                    "smsgw-config-test-{}-{}.toml",
                    std::process::id(),
                    smsgw_sip::random_token(12)
                ));
                std::fs::write(&path, text).unwrap();
                Self(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn conf_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf")
    }

    fn conf_files() -> Vec<PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(conf_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        assert!(!files.is_empty());
        files
    }

    /// Environment variables that the example configs reference with `env:`.
    fn example_env() {
        for (k, v) in [
            ("SMSGW_ADMIN_TOKEN", "t0ken"),
            ("EXT101_PASSWORD", "pw101"),
            ("EXT102_PASSWORD", "pw102"),
            ("TWILIO_AUTH_TOKEN", "authtoken"),
        ] {
            // SAFETY-free: set_var is safe on edition 2021; every test sets the same values.
            std::env::set_var(k, v);
        }
    }

    #[test]
    fn every_example_config_is_valid() {
        example_env();
        for file in conf_files() {
            if let Err(e) = load_with_env(&file, HashMap::new()) {
                panic!("{}: {e}", file.display());
            }
        }
    }

    #[test]
    fn unknown_keys_are_rejected_in_every_section_of_every_example() {
        example_env();
        for file in conf_files() {
            let text = std::fs::read_to_string(&file).unwrap();
            let mut sections: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
            sections.dedup();
            for section in sections {
                let mutated = text.replacen(section, &format!("{section}\nbogus_key = 1"), 1);
                let f = write(&mutated);
                let err = load_with_env(&f.0, HashMap::new()).expect_err(section);
                assert!(
                    err.problems
                        .iter()
                        .any(|p| p.key.ends_with("bogus_key") && p.message.contains("unknown key")),
                    "{}: {section}: {err}",
                    file.display()
                );
            }
        }
    }

    const BAD: &str = r#"
[gateway]
domain = "pbx example"
public_url = "ftp://x"
data_dir = "./data"

[sip]
listen = ["udp:0.0.0.0:5060", "sctp:1.2.3.4:5060", "tcp:nope"]

[http]
webhook_listen = "0.0.0.0"
admin_listen = "127.0.0.1:8081"
admin_token = "env:SMSGW_TEST_SURELY_UNSET_VAR"

[[extensions]]
id = "101"
password = "x"
dids = ["+15017122661", "5551234"]

[[extensions]]
id = "101"
password = ""
dids = ["+15017122661"]

[[trunks]]
name = "pbx"
allow = ["10.0.0.0/33"]
uri = "http://x"

[[sms]]
name = "main"
account_sid = "AC123"
auth_token = "t"
api_key_sid = "SKzz"
api_key_secret = "s"
dids = ["+15017122661"]
sender_id = "TOOLONGSENDER"
messaging_service_sid = "MGnot"
allowed_countries = ["US", "XX"]
"#;

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let f = write(BAD);
        let err = load_with_env(&f.0, HashMap::new()).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "gateway.domain",
            "gateway.public_url",
            "sip.listen[1]",
            "sip.listen[2]",
            "http.webhook_listen",
            "http.admin_token",
            "extensions[0].dids[1]",
            "extensions[1].id",
            "extensions[1].password",
            "extensions[1].dids[0]",
            "trunks[0].allow[0]",
            "trunks[0].uri",
            "sms[0].account_sid",
            "sms[0].api_key_sid",
            "sms[0].sender_id",
            "sms[0].messaging_service_sid",
            "sms[0].allowed_countries[1]",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {err}");
        }
        let text = err.to_string();
        assert!(
            text.contains("SMSGW_TEST_SURELY_UNSET_VAR is not set"),
            "{text}"
        );
        assert!(text.contains("longer than 11"), "{text}");
    }

    #[test]
    fn type_errors_name_the_key() {
        let f = write(&BAD.replace("[sip]", "[sip]\nmin_expires = \"soon\""));
        let err = load_with_env(&f.0, HashMap::new()).unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.key == "sip.min_expires"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_keys_and_secrets_are_redacted() {
        example_env();
        let file = conf_dir().join("demo.toml");
        let env = HashMap::from([
            (
                "SMSGW__HTTP__ADMIN_TOKEN".to_string(),
                "from-env".to_string(),
            ),
            (
                "SMSGW__SIP__LISTEN".to_string(),
                "udp:127.0.0.1:5999,tcp:127.0.0.1:5999".to_string(),
            ),
            (
                "SMSGW__GATEWAY__DOMAIN".to_string(),
                "sip.example.org".to_string(),
            ),
        ]);
        let s = load_with_env(&file, env).unwrap();
        assert_eq!(s.http.admin_token.expose(), "from-env");
        assert_eq!(s.gateway.domain, "sip.example.org");
        assert_eq!(s.sip.listen.len(), 2);
        assert_eq!(s.sip.listen[0].1.port(), 5999);
        let debug = format!("{s:?}");
        assert!(!debug.contains("from-env"), "secret leaked in Debug");
        assert!(!debug.contains(s.extensions[0].password.expose()));
        let bad = HashMap::from([("SMSGW__SIP__BOGUS".to_string(), "1".to_string())]);
        let err = load_with_env(&file, bad).unwrap_err();
        assert!(err.problems.iter().any(|p| p.key == "sip.bogus"), "{err}");
    }

    #[test]
    fn file_secrets_are_read_and_trimmed() {
        let secret = write("s3cret\n");
        let text = std::fs::read_to_string(conf_dir().join("demo.toml")).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        for l in &mut lines {
            if l.starts_with("admin_token") {
                *l = format!("admin_token = \"file:{}\"", secret.0.display());
            }
        }
        let f = write(&lines.join("\n"));
        let s = load_with_env(&f.0, HashMap::new()).unwrap();
        assert_eq!(s.http.admin_token.expose(), "s3cret");
        let mut out = Vec::new();
        write!(out, "{}", s.http.admin_token).unwrap();
        assert_eq!(out, b"[redacted]");
    }
}
