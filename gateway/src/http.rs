//! The two HTTP listeners. The webhook listener carries only Twilio-facing routes; the admin
//! listener carries health, metrics and the admin API and is never meant for the internet.

use crate::config::Secret;
use crate::messaging::{now_ms, Messaging, OwnedSource};
use crate::metrics::Metrics;
use crate::store::{Direction, Message, MessageFilter, Store};
use axum::extract::ConnectInfo;
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use smsgw_rules::MessageStatus;
use smsgw_sip::registrar::Registrar;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct AdminState {
    pub registrar: Arc<Registrar>,
    pub metrics: Arc<Metrics>,
    pub admin_token: Secret,
    pub ready: Arc<AtomicBool>,
    pub messaging: Option<Arc<Messaging>>,
}

/// Largest webhook body accepted (Twilio's are a few KiB).
const WEBHOOK_BODY_LIMIT: usize = 64 * 1024;
/// Webhooks and status callbacks handled at once on the webhook listener.
const WEBHOOK_CONCURRENCY: usize = 1024;
/// Media downloads served at once.
const MEDIA_CONCURRENCY: usize = 32;

async fn shed(
    limit: Arc<tokio::sync::Semaphore>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match limit.try_acquire_owned() {
        Ok(_permit) => next.run(req).await,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "busy\n",
        )
            .into_response(),
    }
}

/// The only listener meant for the internet: Twilio's webhooks and status callbacks, and the
/// media smsgw serves to Twilio and to phones.
pub fn webhook_router(messaging: Arc<Messaging>) -> Router {
    // Load shedding: the listener faces the internet, so work in progress is bounded and the
    // excess gets 503 at once (Twilio retries) instead of queueing. Media (up to 5 MiB each) has
    // its own, smaller bound.
    let hooks = Arc::new(tokio::sync::Semaphore::new(WEBHOOK_CONCURRENCY));
    let files = Arc::new(tokio::sync::Semaphore::new(MEDIA_CONCURRENCY));
    let twilio = Router::new()
        .route("/twilio/sms/{token}", post(sms_webhook))
        .route("/twilio/status/{token}", post(status_webhook))
        .layer(axum::middleware::from_fn(move |req, next| {
            shed(hooks.clone(), req, next)
        }));
    let media_routes =
        Router::new()
            .route("/media/{token}", get(media))
            .layer(axum::middleware::from_fn(move |req, next| {
                shed(files.clone(), req, next)
            }));
    twilio
        .merge(media_routes)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT))
        .with_state(messaging)
}

async fn sms_webhook(
    State(m): State<Arc<Messaging>>,
    Path(token): Path<String>,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    m.on_sms_webhook(&token, query.as_deref(), &headers, &body, &peer.to_string())
        .await
}

async fn status_webhook(
    State(m): State<Arc<Messaging>>,
    Path(token): Path<String>,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    m.on_status_request(&token, query.as_deref(), &headers, &body, &peer.to_string())
        .await
}

async fn media(State(m): State<Arc<Messaging>>, Path(token): Path<String>) -> Response {
    m.media_response(&token).await
}

pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/registrations", get(registrations))
        .route("/api/messages", get(list_messages).post(send_message))
        .route("/api/messages/{id}", get(get_message))
        .route("/api/sms-configs", get(sms_configs))
        .route(
            "/api/sms-configs/{name}/rotate-webhook",
            post(rotate_webhook),
        )
        .with_state(state)
}

/// The admin token checked, then the messaging pipelines (401 or 503 otherwise).
fn admin_messaging<'a>(
    s: &'a AdminState,
    headers: &HeaderMap,
) -> Result<&'a Arc<Messaging>, Box<Response>> {
    if !authorized(headers, &s.admin_token) {
        return Err(Box::new(unauthorized()));
    }
    s.messaging.as_ref().ok_or_else(|| {
        Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "messaging is not running",
        ))
    })
}

#[derive(Serialize)]
struct MessageView {
    id: i64,
    direction: &'static str,
    kind: &'static str,
    sms_config: String,
    extension: Option<String>,
    trunk: Option<String>,
    remote: String,
    sender: String,
    body: String,
    media: Vec<String>,
    twilio_sid: Option<String>,
    status: &'static str,
    error_code: Option<i64>,
    error_message: Option<String>,
    segments: u32,
    created_at: i64,
    updated_at: i64,
    attempts: u32,
    queued_until: Option<i64>,
    detail: serde_json::Value,
}

impl From<Message> for MessageView {
    fn from(m: Message) -> Self {
        Self {
            id: m.id,
            direction: m.direction.as_str(),
            kind: m.kind.as_str(),
            sms_config: m.sms_config,
            extension: m.extension,
            trunk: m.trunk,
            remote: m.remote,
            sender: m.sender,
            body: m.body,
            media: m.media,
            twilio_sid: m.twilio_sid,
            status: m.status.as_str(),
            error_code: m.error_code,
            error_message: m.error_message,
            segments: m.segments,
            created_at: m.created_at,
            updated_at: m.updated_at,
            attempts: m.attempts,
            queued_until: m.next_attempt_at,
            detail: m.meta,
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    direction: Option<String>,
    extension: Option<String>,
    number: Option<String>,
    status: Option<String>,
    /// Unix milliseconds.
    since: Option<i64>,
    until: Option<i64>,
    before_id: Option<i64>,
    limit: Option<u32>,
}

async fn list_messages(
    State(s): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let m = match admin_messaging(&s, &headers) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let direction = match q.direction.as_deref() {
        None => None,
        Some("outbound") => Some(Direction::Outbound),
        Some("inbound") => Some(Direction::Inbound),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "direction must be inbound or outbound",
            )
        }
    };
    let status = match q.status.as_deref().map(MessageStatus::parse) {
        None => None,
        Some(Some(st)) => Some(st),
        Some(None) => return error(StatusCode::BAD_REQUEST, "unknown status"),
    };
    let filter = MessageFilter {
        direction,
        extension: q.extension,
        number: q.number,
        status,
        since: q.since,
        until: q.until,
        before_id: q.before_id,
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    match m.store.list_messages(filter).await {
        Ok(list) => {
            Json(list.into_iter().map(MessageView::from).collect::<Vec<_>>()).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn get_message(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    let m = match admin_messaging(&s, &headers) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    match m.store.message(id).await {
        Ok(Some(msg)) => Json(MessageView::from(msg)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such message"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    /// Send as this extension (its rules, DIDs, limits)…
    extension: Option<String>,
    /// …or as this trunk.
    trunk: Option<String>,
    to: String,
    body: String,
}

/// Sends through the same path as a phone's MESSAGE; answers once Twilio accepted or refused it.
async fn send_message(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<SendBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let m = match admin_messaging(&s, &headers) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let source = match (b.extension, b.trunk) {
        (Some(e), None) if m.settings.extensions.iter().any(|x| x.id.as_str() == e) => {
            OwnedSource::Extension(e)
        }
        (None, Some(t)) if m.settings.trunks.iter().any(|x| x.name == t) => OwnedSource::Trunk(t),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of extension or trunk, naming a configured one",
            )
        }
    };
    if b.body.trim().is_empty() {
        return error(StatusCode::BAD_REQUEST, "body is empty");
    }
    let out = crate::content::Outgoing {
        text: b.body,
        ..Default::default()
    };
    match m.submit_and_send(&source, &b.to, out).await {
        Ok(list) => (
            StatusCode::CREATED,
            Json(list.into_iter().map(MessageView::from).collect::<Vec<_>>()),
        )
            .into_response(),
        Err(r) => (
            StatusCode::from_u16(match r.status {
                404 | 484 => 422,
                403 => 403,
                413 => 413,
                503 => 429,
                _ => 500,
            })
            .unwrap_or(StatusCode::BAD_REQUEST),
            Json(serde_json::json!({"error": r.reason, "sip_status": r.status})),
        )
            .into_response(),
    }
}

#[derive(Serialize)]
struct SmsConfigView {
    name: String,
    account_sid: String,
    dids: Vec<String>,
    webhook_url: String,
    status_callback_url: String,
    last_webhook_at: Option<u64>,
}

async fn sms_configs(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    let m = match admin_messaging(&s, &headers) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let list: Vec<SmsConfigView> = m
        .settings
        .sms
        .iter()
        .enumerate()
        .map(|(i, c)| SmsConfigView {
            name: c.name.clone(),
            account_sid: c.account_sid.clone(),
            dids: c.dids.iter().map(ToString::to_string).collect(),
            webhook_url: m.webhook_url(i),
            status_callback_url: m.status_callback_url(i),
            last_webhook_at: m
                .last_webhook(&c.name)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        })
        .collect();
    Json(list).into_response()
}

async fn rotate_webhook(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let m = match admin_messaging(&s, &headers) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    match m.rotate_token(&name).await {
        Ok(Some(url)) => {
            Json(serde_json::json!({"name": name, "webhook_url": url, "rotated_at": now_ms()}))
                .into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no SMS configuration of that name"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// A JSON error body: `{"error": "..."}`.
fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn authorized(headers: &HeaderMap, token: &Secret) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.as_bytes().ct_eq(token.expose().as_bytes()).into()
}

fn unauthorized() -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong admin token: send 'Authorization: Bearer <http.admin_token>'",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Bearer".parse().expect("static header"),
    );
    r
}

#[derive(Serialize)]
struct RegistrationView {
    extension: String,
    contact: String,
    transport: &'static str,
    source: String,
    local: String,
    expires_in: u64,
    expires_at: u64,
}

async fn registrations(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &s.admin_token) {
        return unauthorized();
    }
    let now = tokio::time::Instant::now();
    let now_unix = crate::registration::unix_now();
    let list: Vec<_> = s
        .registrar
        .snapshot(now)
        .into_iter()
        .map(|(aor, b)| {
            let left = b.remaining(now).as_secs();
            RegistrationView {
                extension: aor.to_string(),
                contact: b.contact.to_string(),
                transport: b.flow.transport.as_str(),
                source: b.flow.remote.to_string(),
                local: b.flow.local.to_string(),
                expires_in: left,
                expires_at: now_unix + left,
            }
        })
        .collect();
    Json(list).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use smsgw_sip::registrar::{ExpiryLimits, RegistrarConfig};
    use tower_service::Service as _;

    fn state() -> AdminState {
        AdminState {
            registrar: Arc::new(Registrar::new(RegistrarConfig {
                limits: ExpiryLimits {
                    min: 60,
                    max: 3600,
                    default: 3600,
                },
                max_contacts_per_aor: 10,
            })),
            metrics: Arc::new(Metrics::new()),
            admin_token: Secret::new("tok"),
            ready: Arc::new(AtomicBool::new(false)),
            messaging: None,
        }
    }

    async fn call(router: &mut Router, path: &str, auth: Option<&str>) -> (StatusCode, String) {
        let mut req = Request::get(path);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let resp = router.call(req.body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn registrations_need_the_token() {
        let s = state();
        let mut app = admin_router(s.clone());
        assert_eq!(
            call(&mut app, "/api/registrations", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&mut app, "/api/registrations", Some("Bearer nope"))
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        let (status, body) = call(&mut app, "/api/registrations", Some("Bearer tok")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "[]");
    }

    #[tokio::test]
    async fn readiness_follows_the_flag_and_metrics_render() {
        let s = state();
        let mut app = admin_router(s.clone());
        assert_eq!(
            call(&mut app, "/readyz", None).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.ready.store(true, Ordering::Release);
        assert_eq!(call(&mut app, "/readyz", None).await.0, StatusCode::OK);
        assert_eq!(call(&mut app, "/healthz", None).await.0, StatusCode::OK);
        let (_, body) = call(&mut app, "/metrics", None).await;
        assert!(body.contains("smsgw_registrations"), "{body}");
    }
}
