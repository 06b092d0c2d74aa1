//! The two HTTP listeners. The webhook listener carries only Twilio-facing routes; the admin
//! listener carries health, metrics and the admin API and is never meant for the internet.

use crate::config::Secret;
use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use smsgw_sip::registrar::Registrar;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct AdminState {
    pub registrar: Arc<Registrar>,
    pub metrics: Arc<Metrics>,
    pub admin_token: Secret,
    pub ready: Arc<AtomicBool>,
}

/// Twilio-facing routes (webhooks, status callbacks, media) join here with the messaging issues.
pub fn webhook_router() -> Router {
    Router::new().fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
}

pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/registrations", get(registrations))
        .with_state(state)
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
