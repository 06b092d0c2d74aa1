//! The Twilio stand-in: the parts of the 2010 API smsgw uses, answering as Twilio does (JSON
//! shapes, error codes, test-credential magic numbers), checking each request against Twilio's
//! OpenAPI description when given it, sending signed status callbacks and inbound webhooks, and
//! able to fail on demand. It is the test double and the newcomer's demo (`smsgw twilio-sim`).
//!
//! Control routes (not Twilio's): `POST /_sim/mode`, `POST /_sim/inbound`, `POST /_sim/reset`,
//! `GET /_sim/requests`, `/_sim/messages`, `/_sim/violations`, `/_sim/media-fetches`.

use crate::config::Secret;
use crate::twilio::signature;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Entries each inspection list (requests, messages, media fetches, violations) keeps; older
/// ones are dropped, so a stand-in left running stays bounded.
const MAX_RECORDED: usize = 200_000;

/// An inspection list: the newest `MAX_RECORDED` entries. Its room is reserved up front (address
/// space only, until used) and the oldest entry goes when it is full, so the list is never copied
/// while its lock is held. Copying a growing list at each doubling held up every request for
/// milliseconds: under load it showed as Twilio answering 15–25 ms late.
struct Recent<T>(Mutex<VecDeque<T>>);

impl<T> Recent<T> {
    fn new() -> Self {
        Self(Mutex::new(VecDeque::with_capacity(MAX_RECORDED)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        self.0.lock().expect("lock")
    }

    fn keep(&self, items: impl IntoIterator<Item = T>) {
        let mut list = self.lock();
        for item in items {
            if list.len() >= MAX_RECORDED {
                list.pop_front();
            }
            list.push_back(item);
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub account_sid: String,
    pub auth_token: Secret,
    pub api_keys: Vec<(String, Secret)>,
    /// The account's SMS-capable numbers.
    pub numbers: Vec<String>,
    /// Twilio's OpenAPI description, to check every request against.
    pub spec: Option<Value>,
    /// Delay before each status callback.
    pub callback_delay: Duration,
    /// Where `/_sim/inbound` posts when the request names no URL.
    pub default_webhook: Option<String>,
    /// The base URL this stand-in is reachable at (for media URLs it hands out).
    pub public_base: String,
}

/// How the stand-in behaves; `POST /_sim/mode` replaces it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mode {
    /// "error500", "rate_limit" (429 with Retry-After) or "timeout" (no answer for 60 s).
    pub fail: Option<String>,
    /// How many sends fail before it behaves again; absent: until changed.
    pub fail_count: Option<u32>,
    pub retry_after_secs: Option<u64>,
    /// Added before every answer.
    pub latency_ms: u64,
    /// Added after a message is created and before the answer, so that its status callbacks can
    /// arrive before the answer does (over the internet they can).
    pub answer_delay_ms: u64,
    /// The final status callbacks report: "delivered" (default), "undelivered" or "failed".
    pub final_status: Option<String>,
    pub error_code: Option<i64>,
    pub error_message: Option<String>,
    /// Leave out status callbacks altogether.
    pub no_callbacks: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub auth_user: Option<String>,
    pub form: Vec<(String, String)>,
    pub status: u16,
    /// Unix milliseconds when the request arrived.
    pub at_ms: u128,
}

#[derive(Debug, Clone, Serialize)]
struct SimMessage {
    sid: String,
    to: String,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: String,
    media_urls: Vec<String>,
    status: String,
    num_segments: String,
    #[serde(skip)]
    created: SystemTime,
    date_created: String,
    error_code: Option<i64>,
    error_message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct MediaFetch {
    url: String,
    status: u16,
    bytes: usize,
    content_type: String,
}

struct SimState {
    config: SimConfig,
    mode: Mutex<Mode>,
    requests: Recent<Recorded>,
    messages: Recent<SimMessage>,
    sms_urls: Mutex<HashMap<String, String>>,
    violations: Recent<String>,
    media_fetches: Recent<MediaFetch>,
    http: reqwest::Client,
}

pub fn router(config: SimConfig) -> Router {
    let state = Arc::new(SimState {
        config,
        mode: Mutex::default(),
        requests: Recent::new(),
        messages: Recent::new(),
        sms_urls: Mutex::default(),
        violations: Recent::new(),
        media_fetches: Recent::new(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("http client"),
    });
    Router::new()
        .route(
            "/2010-04-01/Accounts/{account}/{*rest}",
            get(api_get).post(api_post),
        )
        .route("/media/{name}", get(media))
        .route("/_sim/mode", post(set_mode))
        .route("/_sim/reset", post(reset))
        .route("/_sim/stats", get(stats))
        .route("/_sim/inbound", post(inbound))
        .route(
            "/_sim/requests",
            get(|State(s): State<Arc<SimState>>| async move { snapshot(&s.requests) }),
        )
        .route(
            "/_sim/messages",
            get(|State(s): State<Arc<SimState>>| async move { snapshot(&s.messages) }),
        )
        .route(
            "/_sim/violations",
            get(|State(s): State<Arc<SimState>>| async move { snapshot(&s.violations) }),
        )
        .route(
            "/_sim/media-fetches",
            get(|State(s): State<Arc<SimState>>| async move { snapshot(&s.media_fetches) }),
        )
        .with_state(state)
}

fn twilio_error(http: StatusCode, code: i64, message: &str) -> Response {
    (
        http,
        Json(json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": http.as_u16(),
        })),
    )
        .into_response()
}

fn basic_user(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

impl SimState {
    fn authorized(&self, headers: &HeaderMap) -> Option<String> {
        let (user, pass) = basic_user(headers)?;
        let ok = (user == self.config.account_sid && pass == self.config.auth_token.expose())
            || self
                .config
                .api_keys
                .iter()
                .any(|(sid, secret)| *sid == user && secret.expose() == pass);
        ok.then_some(user)
    }

    fn record(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        form: &[(String, String)],
        status: u16,
    ) {
        let recorded = Recorded {
            method: method.into(),
            path: path.into(),
            auth_user: basic_user(headers).map(|(u, _)| u),
            form: form.to_vec(),
            status,
            at_ms: SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        };
        self.requests.keep([recorded]);
    }

    /// Checks a Messages create request against the OpenAPI schema: known names, required
    /// fields, patterns, integer/boolean/enum values.
    fn check_against_spec(&self, form: &[(String, String)]) {
        let Some(spec) = &self.config.spec else {
            return;
        };
        let schema = &spec["paths"]["/2010-04-01/Accounts/{AccountSid}/Messages.json"]["post"]
            ["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"];
        let props = &schema["properties"];
        let mut problems = Vec::new();
        for name in schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !form.iter().any(|(k, _)| k == name) {
                problems.push(format!("required parameter {name} is missing"));
            }
        }
        for (name, value) in form {
            let Some(prop) = props.get(name.as_str()) else {
                problems.push(format!("parameter {name} is not in the API"));
                continue;
            };
            let (kind, item) = match prop["type"].as_str() {
                Some("array") => (prop["items"]["type"].as_str(), &prop["items"]),
                other => (other, prop),
            };
            if !form.iter().filter(|(k, _)| k == name).count().eq(&1) && prop["type"] != "array" {
                problems.push(format!("parameter {name} is repeated but is not an array"));
            }
            let type_ok = match kind {
                Some("integer") => value.parse::<i64>().is_ok(),
                Some("boolean") => value == "true" || value == "false",
                Some("number") => value.parse::<f64>().is_ok(),
                _ => true,
            };
            if !type_ok {
                problems.push(format!(
                    "{name}={value:?} is not a {}",
                    kind.unwrap_or("value")
                ));
            }
            if let Some(pattern) = item["pattern"].as_str() {
                if !regex::Regex::new(pattern).is_ok_and(|re| re.is_match(value)) {
                    problems.push(format!("{name}={value:?} does not match {pattern}"));
                }
            }
            if let Some(allowed) = item["enum"].as_array() {
                if !allowed.iter().any(|a| a.as_str() == Some(value)) {
                    problems.push(format!("{name}={value:?} is not one of {allowed:?}"));
                }
            }
            if let (Some(min), Some(max)) = (item["minimum"].as_i64(), item["maximum"].as_i64()) {
                if value.parse::<i64>().is_ok_and(|v| v < min || v > max) {
                    problems.push(format!("{name}={value} is outside {min}..{max}"));
                }
            }
        }
        if !problems.is_empty() {
            self.violations.keep(problems);
        }
    }

    fn owns(&self, number: &str) -> bool {
        number == "+15005550006" || self.config.numbers.iter().any(|n| n == number)
    }
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn get1<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn rfc2822(t: SystemTime) -> String {
    httpdate::fmt_http_date(t).replace("GMT", "+0000")
}

fn new_sid(prefix: &str) -> String {
    use std::fmt::Write as _;
    let bytes: [u8; 16] = rand::random();
    let mut sid = String::with_capacity(prefix.len() + 32);
    sid.push_str(prefix);
    for b in bytes {
        let _ = write!(sid, "{b:02x}");
    }
    sid
}

/// Twilio's Message resource, serialized straight from the stored message (fields in Twilio's
/// alphabetical order).
#[derive(Serialize)]
struct MessageJson<'a> {
    account_sid: &'a str,
    api_version: &'static str,
    body: &'a str,
    date_created: &'a str,
    date_sent: &'a str,
    date_updated: &'a str,
    direction: &'static str,
    error_code: Option<i64>,
    error_message: Option<&'a str>,
    from: Option<&'a str>,
    messaging_service_sid: Option<&'a str>,
    num_media: String,
    num_segments: &'a str,
    price: Option<&'static str>,
    price_unit: &'static str,
    sid: &'a str,
    status: &'a str,
    subresource_uris: SubresourceUris,
    to: &'a str,
    uri: String,
}

#[derive(Serialize)]
struct SubresourceUris {
    media: String,
}

fn message_json<'a>(account: &'a str, m: &'a SimMessage) -> MessageJson<'a> {
    MessageJson {
        account_sid: account,
        api_version: "2010-04-01",
        body: &m.body,
        date_created: &m.date_created,
        date_sent: &m.date_created,
        date_updated: &m.date_created,
        direction: "outbound-api",
        error_code: m.error_code,
        error_message: m.error_message.as_deref(),
        from: m.from.as_deref(),
        messaging_service_sid: m.messaging_service_sid.as_deref(),
        num_media: m.media_urls.len().to_string(),
        num_segments: &m.num_segments,
        price: None,
        price_unit: "USD",
        sid: &m.sid,
        status: &m.status,
        subresource_uris: SubresourceUris {
            media: format!(
                "/2010-04-01/Accounts/{account}/Messages/{}/Media.json",
                m.sid
            ),
        },
        to: &m.to,
        uri: format!("/2010-04-01/Accounts/{account}/Messages/{}.json", m.sid),
    }
}

/// The same as a JSON value, for pages and lookups that outlive the stored message's lock.
fn message_value(account: &str, m: &SimMessage) -> Value {
    serde_json::to_value(message_json(account, m)).expect("plain data serializes")
}

async fn api_post(
    State(s): State<Arc<SimState>>,
    Path((account, rest)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = form_pairs(&body);
    let path = format!("/2010-04-01/Accounts/{account}/{rest}");
    let mode = s.mode.lock().expect("lock").clone();
    if mode.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(mode.latency_ms)).await;
    }
    let resp = api_post_inner(&s, &account, &rest, &headers, &form, &mode).await;
    s.record("POST", &path, &headers, &form, resp.status().as_u16());
    if mode.answer_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(mode.answer_delay_ms)).await;
    }
    resp
}

/// Takes one failure from the mode's budget; true when this request should fail.
fn take_failure(s: &SimState) -> bool {
    let mut mode = s.mode.lock().expect("lock");
    if mode.fail.is_none() {
        return false;
    }
    match mode.fail_count {
        Some(0) => {
            mode.fail = None;
            false
        }
        Some(n) => {
            mode.fail_count = Some(n - 1);
            true
        }
        None => true,
    }
}

/// Twilio's answer to a request with wrong credentials (401) or for another account (404).
fn refuse_caller(s: &SimState, headers: &HeaderMap, account: &str) -> Option<Response> {
    if s.authorized(headers).is_none() {
        return Some(twilio_error(
            StatusCode::UNAUTHORIZED,
            20003,
            "Authenticate",
        ));
    }
    (account != s.config.account_sid).then(|| {
        twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        )
    })
}

async fn api_post_inner(
    s: &Arc<SimState>,
    account: &str,
    rest: &str,
    headers: &HeaderMap,
    form: &[(String, String)],
    mode: &Mode,
) -> Response {
    if let Some(refused) = refuse_caller(s, headers, account) {
        return refused;
    }
    if let Some(sid) = rest
        .strip_prefix("IncomingPhoneNumbers/")
        .and_then(|r| r.strip_suffix(".json"))
    {
        return update_number(s, sid, form);
    }
    if rest != "Messages.json" {
        return twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    }
    if take_failure(s) {
        match mode.fail.as_deref() {
            Some("rate_limit") => {
                let mut r = twilio_error(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests");
                let after = mode.retry_after_secs.unwrap_or(1).to_string();
                r.headers_mut()
                    .insert(header::RETRY_AFTER, after.parse().expect("digits"));
                return r;
            }
            Some("timeout") => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return twilio_error(StatusCode::GATEWAY_TIMEOUT, 20504, "Gateway timeout");
            }
            _ => {
                return twilio_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    20500,
                    "Internal Server Error",
                )
            }
        }
    }
    s.check_against_spec(form);
    create_message(s, form, mode)
}

fn create_message(s: &Arc<SimState>, form: &[(String, String)], mode: &Mode) -> Response {
    let bad = |code, msg: &str| twilio_error(StatusCode::BAD_REQUEST, code, msg);
    let Some(to) = get1(form, "To") else {
        return bad(21604, "A 'To' phone number is required.");
    };
    let from = get1(form, "From");
    let service = get1(form, "MessagingServiceSid");
    if from.is_none() && service.is_none() {
        return bad(21603, "A 'From' phone number is required.");
    }
    let body = get1(form, "Body").unwrap_or_default();
    let media: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "MediaUrl")
        .map(|(_, v)| v.clone())
        .collect();
    if body.is_empty() && media.is_empty() {
        return bad(21602, "Message body is required.");
    }
    if body.chars().count() > 1600 {
        return bad(
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        );
    }
    if media.len() > 10 {
        return bad(21623, "The number of media URLs exceeds the limit of 10.");
    }
    if let Some(mg) = service {
        let ok = mg.len() == 34
            && mg.starts_with("MG")
            && mg[2..].bytes().all(|b| b.is_ascii_hexdigit());
        if !ok {
            return bad(21701, "The Messaging Service Sid is invalid.");
        }
    }
    match from {
        Some("+15005550001") => return bad(21212, "The 'From' number +15005550001 is not a valid phone number, shortcode, or alphanumeric sender ID."),
        Some("+15005550007") => return bad(21606, "The 'From' phone number provided (+15005550007) is not a valid message-capable Twilio phone number for this destination/account."),
        Some("+15005550008") => return bad(21611, "This 'From' number has exceeded the maximum number of queued messages."),
        Some(f) if f.starts_with('+') && !s.owns(f) => {
            return bad(21606, &format!("The 'From' phone number provided ({f}) is not a valid message-capable Twilio phone number for this destination/account."))
        }
        Some(f) if !f.starts_with('+') && smsgw_rules::SenderId::parse(f).is_err() => {
            return bad(21212, &format!("The 'From' number {f} is not a valid phone number, shortcode, or alphanumeric sender ID."))
        }
        _ => {}
    }
    match to {
        "+15005550001" => return bad(21211, "The 'To' number +15005550001 is not a valid phone number."),
        "+15005550002" => return bad(21612, "The 'To' phone number is not currently reachable via SMS."),
        "+15005550003" => return bad(21408, "Permission to send an SMS has not been enabled for the region indicated by the 'To' number."),
        "+15005550004" => return bad(21610, "Attempt to send to unsubscribed recipient"),
        "+15005550009" => return bad(21614, "'To' number is not a valid mobile number"),
        t if smsgw_rules::E164::parse(t).is_err() => {
            return bad(21211, &format!("The 'To' number {t} is not a valid phone number."))
        }
        _ => {}
    }
    let now = SystemTime::now();
    let message = SimMessage {
        sid: new_sid(if media.is_empty() { "SM" } else { "MM" }),
        to: to.into(),
        from: from.map(str::to_string),
        messaging_service_sid: service.map(str::to_string),
        body: body.into(),
        media_urls: media.clone(),
        status: if service.is_some() {
            "accepted".into()
        } else {
            "queued".into()
        },
        num_segments: if service.is_some() {
            "0".into()
        } else {
            smsgw_rules::segments::count(body).count.to_string()
        },
        created: now,
        date_created: rfc2822(now),
        error_code: None,
        error_message: None,
    };
    let created = (
        StatusCode::CREATED,
        Json(message_json(&s.config.account_sid, &message)),
    )
        .into_response();
    let callbacks = get1(form, "StatusCallback")
        .filter(|_| !mode.no_callbacks)
        .map(|cb| (cb.to_string(), message.clone()));
    s.messages.keep([message]);
    for url in media {
        tokio::spawn(fetch_media(s.clone(), url));
    }
    if let Some((cb, message)) = callbacks {
        tokio::spawn(status_callbacks(s.clone(), message, cb, mode.clone()));
    }
    created
}

async fn fetch_media(s: Arc<SimState>, url: String) {
    let fetched = s.http.get(&url).send().await;
    let entry = match fetched {
        Ok(r) => {
            let status = r.status().as_u16();
            let content_type = r
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let bytes = r.bytes().await.map(|b| b.len()).unwrap_or(0);
            MediaFetch {
                url,
                status,
                bytes,
                content_type,
            }
        }
        Err(_) => MediaFetch {
            url,
            status: 0,
            bytes: 0,
            content_type: String::new(),
        },
    };
    s.media_fetches.keep([entry]);
}

/// Signs (with `token`) and posts `params` to `url` as Twilio does.
async fn post_signed(
    s: &SimState,
    token: &str,
    url: &str,
    params: &[(String, String)],
) -> Result<(u16, String), String> {
    let sig = signature::compute(token, url, params);
    let resp = s
        .http
        .post(url)
        .header("X-Twilio-Signature", sig)
        .header("I-Twilio-Idempotency-Token", new_sid(""))
        .header(header::USER_AGENT, "TwilioProxy/1.1")
        .form(params)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await.unwrap_or_default()))
}

async fn status_callbacks(s: Arc<SimState>, m: SimMessage, url: String, mode: Mode) {
    let final_status = mode
        .final_status
        .clone()
        .unwrap_or_else(|| "delivered".into());
    let steps: Vec<&str> = match final_status.as_str() {
        "failed" => vec!["failed"],
        other => vec!["sent", other],
    };
    for status in steps {
        tokio::time::sleep(s.config.callback_delay).await;
        let mut params = vec![
            ("AccountSid".to_string(), s.config.account_sid.clone()),
            ("ApiVersion".into(), "2010-04-01".into()),
            ("MessageSid".into(), m.sid.clone()),
            ("SmsSid".into(), m.sid.clone()),
            ("MessageStatus".into(), status.into()),
            ("SmsStatus".into(), status.into()),
            ("To".into(), m.to.clone()),
        ];
        if let Some(f) = &m.from {
            params.push(("From".into(), f.clone()));
        }
        if let Some(mg) = &m.messaging_service_sid {
            params.push(("MessagingServiceSid".into(), mg.clone()));
        }
        let failed = matches!(status, "failed" | "undelivered");
        if failed {
            params.push((
                "ErrorCode".into(),
                mode.error_code.unwrap_or(30007).to_string(),
            ));
            if let Some(msg) = &mode.error_message {
                params.push(("ErrorMessage".into(), msg.clone()));
            }
        }
        // Newest first: the message whose status moves was created moments ago.
        if let Some(sm) = s.messages.lock().iter_mut().rev().find(|x| x.sid == m.sid) {
            sm.status = status.into();
            if failed {
                sm.error_code = Some(mode.error_code.unwrap_or(30007));
            }
        }
        let _ = post_signed(&s, s.config.auth_token.expose(), &url, &params).await;
    }
}

fn update_number(s: &SimState, sid: &str, form: &[(String, String)]) -> Response {
    let numbers = numbers_json(s);
    let Some(n) = numbers.iter().find(|n| n["sid"] == sid) else {
        return twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    };
    let phone = n["phone_number"].as_str().unwrap_or_default().to_string();
    if let Some(method) = get1(form, "SmsMethod") {
        if method != "GET" && method != "POST" {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                21606,
                "SmsMethod must be GET or POST",
            );
        }
    }
    if let Some(url) = get1(form, "SmsUrl") {
        s.sms_urls
            .lock()
            .expect("lock")
            .insert(phone, url.to_string());
    }
    let updated = numbers_json(s)
        .into_iter()
        .find(|n| n["sid"] == sid)
        .unwrap_or_default();
    (StatusCode::OK, Json(updated)).into_response()
}

/// Stable PN sids derived from the number.
fn numbers_json(s: &SimState) -> Vec<Value> {
    let urls = s.sms_urls.lock().expect("lock");
    s.config
        .numbers
        .iter()
        .map(|n| {
            let digits: String = n.chars().filter(char::is_ascii_digit).collect();
            json!({
                "sid": format!("PN{:0>32}", digits),
                "account_sid": s.config.account_sid,
                "phone_number": n,
                "friendly_name": n,
                "capabilities": {"voice": true, "sms": true, "mms": true, "fax": false},
                "sms_url": urls.get(n).cloned().unwrap_or_default(),
                "sms_method": "POST",
                "status": "in-use",
            })
        })
        .collect()
}

async fn api_get(
    State(s): State<Arc<SimState>>,
    Path((account, rest)): Path<(String, String)>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    let path = format!("/2010-04-01/Accounts/{account}/{rest}");
    let q = form_pairs(query.unwrap_or_default().as_bytes());
    let resp = api_get_inner(&s, &account, &rest, &headers, &q);
    s.record("GET", &path, &headers, &q, resp.status().as_u16());
    resp
}

fn api_get_inner(
    s: &SimState,
    account: &str,
    rest: &str,
    headers: &HeaderMap,
    q: &[(String, String)],
) -> Response {
    if let Some(refused) = refuse_caller(s, headers, account) {
        return refused;
    }
    let page_size: usize = get1(q, "PageSize")
        .and_then(|p| p.parse().ok())
        .unwrap_or(50)
        .clamp(1, 1000);
    let page: usize = get1(q, "Page").and_then(|p| p.parse().ok()).unwrap_or(0);
    let base = format!("/2010-04-01/Accounts/{account}/{rest}");
    // One page of `all` under `key`, with Twilio's paging fields.
    let page_of = |key: &str, all: Vec<Value>| {
        let slice: Vec<Value> = all
            .iter()
            .skip(page * page_size)
            .take(page_size)
            .cloned()
            .collect();
        let next = (all.len() > (page + 1) * page_size).then(|| {
            let mut pairs: Vec<(String, String)> =
                q.iter().filter(|(k, _)| k != "Page").cloned().collect();
            pairs.push(("Page".into(), (page + 1).to_string()));
            let query = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish();
            format!("{base}?{query}")
        });
        Json(json!({key: slice, "page": page, "page_size": page_size, "next_page_uri": next, "uri": base}))
            .into_response()
    };
    match rest {
        "Messages.json" => {
            let to = get1(q, "To");
            let from = get1(q, "From");
            let since = get1(q, "DateSent>").and_then(|d| {
                httpdate::parse_http_date(&format!("{} 00:00:00 GMT", date_to_http(d)?)).ok()
            });
            let all: Vec<Value> = s
                .messages
                .lock()
                .iter()
                .rev()
                .filter(|m| to.is_none_or(|t| m.to == t))
                .filter(|m| from.is_none_or(|f| m.from.as_deref() == Some(f)))
                .filter(|m| since.is_none_or(|t| m.created >= t))
                .map(|m| message_value(&s.config.account_sid, m))
                .collect();
            page_of("messages", all)
        }
        "IncomingPhoneNumbers.json" => page_of("incoming_phone_numbers", numbers_json(s)),
        other => {
            let sid = other
                .strip_prefix("Messages/")
                .and_then(|r| r.strip_suffix(".json"));
            let found = sid.and_then(|sid| {
                s.messages
                    .lock()
                    .iter()
                    .rev()
                    .find(|m| m.sid == sid)
                    .map(|m| message_value(&s.config.account_sid, m))
            });
            match found {
                Some(m) => Json(m).into_response(),
                None => twilio_error(
                    StatusCode::NOT_FOUND,
                    20404,
                    "The requested resource was not found",
                ),
            }
        }
    }
}

/// `2024-05-01` → `Wed, 01 May 2024` for httpdate's parser.
fn date_to_http(date: &str) -> Option<String> {
    let mut it = date.split('-');
    let (y, m, d): (i32, u32, u32) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // Zeller-free weekday: httpdate checks it, so compute it (Sakamoto's method).
    let t = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
    let yy = if m < 3 { y - 1 } else { y };
    let wd = (yy + yy / 4 - yy / 100 + yy / 400 + t[(m - 1) as usize] + d as i32).rem_euclid(7);
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    Some(format!(
        "{}, {d:02} {} {y}",
        DAYS[wd as usize],
        MONTHS.get((m as usize).checked_sub(1)?)?
    ))
}

/// A 1×1 PNG, the media every inbound MMS carries here.
const PIXEL_PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0,
    0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// Media as Twilio hosts it for inbound MMS: behind the account's HTTP Basic credentials.
async fn media(
    State(s): State<Arc<SimState>>,
    Path(_name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if s.authorized(&headers).is_none() {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    ([(header::CONTENT_TYPE, "image/png")], PIXEL_PNG).into_response()
}

/// A copy of one of the stand-in's lists, for inspection.
fn snapshot<T: Clone + Serialize>(list: &Recent<T>) -> Json<Vec<T>> {
    Json(list.lock().iter().cloned().collect())
}

/// Counts only, for load tests where the full lists would be large.
async fn stats(State(s): State<Arc<SimState>>) -> Response {
    let messages = s.messages.lock();
    let mut bodies = std::collections::HashSet::new();
    let duplicates = messages
        .iter()
        .filter(|m| !bodies.insert(m.body.as_str()))
        .count();
    let posts = s
        .requests
        .lock()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    Json(json!({"messages": messages.len(), "posts": posts, "duplicate_bodies": duplicates}))
        .into_response()
}

async fn set_mode(State(s): State<Arc<SimState>>, Json(mode): Json<Mode>) -> Response {
    *s.mode.lock().expect("lock") = mode.clone();
    Json(mode).into_response()
}

async fn reset(State(s): State<Arc<SimState>>) -> Response {
    *s.mode.lock().expect("lock") = Mode::default();
    s.requests.lock().clear();
    s.messages.lock().clear();
    s.violations.lock().clear();
    s.media_fetches.lock().clear();
    StatusCode::NO_CONTENT.into_response()
}

/// An SMS "arriving" at one of the account's numbers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    pub url: Option<String>,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub body: String,
    /// Number of media to attach (served by this stand-in, behind Basic auth).
    #[serde(default)]
    pub media: u32,
    /// Reuse a MessageSid (to test Twilio's retries).
    pub message_sid: Option<String>,
    /// Extra parameters, e.g. OptOutType.
    #[serde(default)]
    pub extra: Vec<(String, String)>,
    /// Sign with this token instead (to test forged signatures).
    pub sign_with: Option<String>,
}

/// The form Twilio posts to "A message comes in".
pub fn inbound_params(
    account_sid: &str,
    media_base: &str,
    inbound: &Inbound,
) -> Vec<(String, String)> {
    let sid = inbound
        .message_sid
        .clone()
        .unwrap_or_else(|| new_sid(if inbound.media > 0 { "MM" } else { "SM" }));
    let mut p: Vec<(String, String)> = vec![
        ("ToCountry".into(), "US".into()),
        ("SmsMessageSid".into(), sid.clone()),
        ("NumMedia".into(), inbound.media.to_string()),
        ("SmsSid".into(), sid.clone()),
        ("SmsStatus".into(), "received".into()),
        ("Body".into(), inbound.body.clone()),
        ("To".into(), inbound.to.clone()),
        (
            "NumSegments".into(),
            smsgw_rules::segments::count(&inbound.body)
                .count
                .to_string(),
        ),
        ("ReferralNumMedia".into(), "0".into()),
        ("MessageSid".into(), sid),
        ("AccountSid".into(), account_sid.into()),
        ("From".into(), inbound.from.clone()),
        ("ApiVersion".into(), "2010-04-01".into()),
    ];
    for i in 0..inbound.media {
        p.push((format!("MediaContentType{i}"), "image/png".into()));
        p.push((
            format!("MediaUrl{i}"),
            format!("{media_base}/media/ME{i:032}"),
        ));
    }
    p.extend(inbound.extra.iter().cloned());
    p
}

async fn inbound(State(s): State<Arc<SimState>>, Json(req): Json<Inbound>) -> Response {
    let Some(url) = req.url.clone().or_else(|| s.config.default_webhook.clone()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "no url given and no default webhook configured"})),
        )
            .into_response();
    };
    let params = inbound_params(&s.config.account_sid, &s.config.public_base, &req);
    let token = req
        .sign_with
        .clone()
        .unwrap_or_else(|| s.config.auth_token.expose().to_string());
    let sid = get1(&params, "MessageSid").unwrap_or_default().to_string();
    match post_signed(&s, &token, &url, &params).await {
        Ok((status, body)) => {
            Json(json!({"message_sid": sid, "status": status, "body": body})).into_response()
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({"message_sid": sid, "error": e})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspection_lists_stay_bounded_and_keep_the_newest() {
        let list = Recent::new();
        list.keep(0..MAX_RECORDED + 2);
        let list = list.lock();
        assert_eq!(list.len(), MAX_RECORDED);
        assert_eq!(list.front(), Some(&2));
        assert_eq!(list.back(), Some(&(MAX_RECORDED + 1)));
    }

    #[test]
    fn dates_for_the_list_filter() {
        assert_eq!(
            date_to_http("2024-05-01").as_deref(),
            Some("Wed, 01 May 2024")
        );
        assert_eq!(
            date_to_http("2026-11-22").as_deref(),
            Some("Sun, 22 Nov 2026")
        );
        assert!(httpdate::parse_http_date(&format!(
            "{} 00:00:00 GMT",
            date_to_http("2026-11-22").unwrap()
        ))
        .is_ok());
    }
}
