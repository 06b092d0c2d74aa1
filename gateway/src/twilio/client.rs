//! The Twilio REST client: Messages (send, list), IncomingPhoneNumbers (list, set SmsUrl), media.

use crate::config::Secret;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Deserialize;
use std::time::Duration;

/// Where and as whom to call the API. Built once per SMS configuration, so the hot path (one
/// POST per message) reuses the URL and the encoded credentials.
#[derive(Debug, Clone)]
pub struct Account {
    pub api_base: String,
    pub account_sid: String,
    /// `Authorization: Basic …` with the Account SID (or API key SID) and the Auth Token (or
    /// API key secret); marked sensitive so it never shows in debug output.
    authorization: HeaderValue,
    /// Parsed once: one POST per message goes there.
    messages_url: Uri,
}

impl Account {
    pub fn for_config(sms: &crate::config::SmsConfig) -> Self {
        use crate::config::TwilioAuth;
        let (username, password): (&str, &Secret) = match &sms.auth {
            TwilioAuth::AuthToken => (&sms.account_sid, &sms.auth_token),
            TwilioAuth::ApiKey { sid, secret } => (sid, secret),
        };
        Self::new(&sms.api_base, &sms.account_sid, username, password)
    }

    fn new(api_base: &str, account_sid: &str, username: &str, password: &Secret) -> Self {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{username}:{}", password.expose()));
        let mut authorization = HeaderValue::from_str(&format!("Basic {basic}"))
            .expect("base64 is a valid header value");
        authorization.set_sensitive(true);
        // The configuration checked api_base as an http(s) URL, and the rest is plain ASCII.
        let messages_url = Uri::try_from(account_url(api_base, account_sid, "Messages.json"))
            .expect("api_base is a checked URL");
        Self {
            api_base: api_base.to_string(),
            account_sid: account_sid.to_string(),
            authorization,
            messages_url,
        }
    }

    fn url(&self, path: &str) -> String {
        account_url(&self.api_base, &self.account_sid, path)
    }
}

fn account_url(api_base: &str, account_sid: &str, path: &str) -> String {
    format!("{api_base}/2010-04-01/Accounts/{account_sid}/{path}")
}

/// A Message resource; every field is optional because Twilio documents them all as nullable.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct MessageResource {
    pub sid: Option<String>,
    pub status: Option<String>,
    pub to: Option<String>,
    pub from: Option<String>,
    pub body: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub num_segments: Option<String>,
    pub error_code: Option<i64>,
    pub error_message: Option<String>,
    pub date_created: Option<String>,
}

/// What sending needs of the Message resource Twilio created (the rest of it is skipped
/// without being copied: this is parsed once per message sent).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Accepted {
    pub sid: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct MessageList {
    #[serde(default)]
    messages: Vec<MessageResource>,
    next_page_uri: Option<String>,
}

/// `date_created` ("Thu, 24 Aug 2023 05:01:45 +0000") as Unix seconds.
fn created_secs(m: &MessageResource) -> Option<i64> {
    let d = m.date_created.as_deref()?;
    let t = httpdate::parse_http_date(&d.replace("+0000", "GMT")).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64)
}

/// An error Twilio answered with, in either of its JSON shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub http_status: u16,
    pub code: i64,
    pub message: String,
}

impl ApiError {
    /// Parses `{code, message, more_info, status}` and the RFC 9457 `{type, title, status, code, detail}`.
    pub fn parse(http_status: u16, body: &[u8]) -> Self {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let code = v
            .get("code")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(i64::from(http_status));
        let message = ["message", "detail", "title"]
            .iter()
            .find_map(|k| v.get(k).and_then(serde_json::Value::as_str))
            .map_or_else(|| format!("HTTP {http_status}"), str::to_string);
        Self {
            http_status,
            code,
            message,
        }
    }
}

/// What a send came to.
#[derive(Debug, Clone)]
pub enum SendOutcome {
    Created(Accepted),
    /// A final refusal (4xx other than 429): do not retry.
    Rejected(ApiError),
    /// Try again later. `in_doubt`: the request may have been processed (timeout after sending,
    /// 5xx), so list before resending.
    Retry {
        after: Option<Duration>,
        reason: String,
        in_doubt: bool,
    },
}

/// Why a request got no complete answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the request could not be built: {0}")]
    Build(#[from] http::Error),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Exchange(String),
    #[error("the answer was cut off: {0}")]
    Body(String),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
}

impl HttpError {
    /// Whether the request may have reached Twilio.
    fn maybe_sent(&self) -> bool {
        !matches!(self, Self::Build(_) | Self::Connect(_))
    }
}

/// An error with its causes, which hyper keeps out of its own message.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A complete answer.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

/// Longest API answer read (a page of 100 messages is far smaller).
const MAX_ANSWER_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach Twilio at {url}: {source}")]
    Http { url: String, source: HttpError },
    #[error("Twilio refused {url}: {} {} ({})", .error.code, .error.message, .error.http_status)]
    Api { url: String, error: ApiError },
    #[error("Twilio answered {url} with something that is not the expected JSON: {source}")]
    Decode {
        url: String,
        source: serde_json::Error,
    },
}

/// A phone number of the account.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct IncomingNumber {
    pub sid: String,
    pub phone_number: String,
    #[serde(default)]
    pub sms_url: Option<String>,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
}

#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
pub struct Capabilities {
    #[serde(default)]
    pub sms: Option<bool>,
    #[serde(default)]
    pub mms: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
struct NumberList {
    #[serde(default)]
    incoming_phone_numbers: Vec<IncomingNumber>,
    next_page_uri: Option<String>,
}

/// The parameters of one `POST Messages.json`.
#[derive(Debug, Clone, Default)]
pub struct SendRequest {
    pub to: String,
    pub from: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub body: String,
    pub media_urls: Vec<String>,
    pub status_callback: Option<String>,
    /// Further optional parameters of the SMS configuration (ValidityPeriod, ProvideFeedback, …).
    pub extra: Vec<(String, String)>,
}

impl SendRequest {
    /// The form parameters, borrowed: encoded once per message sent.
    pub fn form(&self) -> Vec<(&str, &str)> {
        let mut form = vec![("To", self.to.as_str())];
        if let Some(f) = &self.from {
            form.push(("From", f));
        }
        if let Some(m) = &self.messaging_service_sid {
            form.push(("MessagingServiceSid", m));
        }
        if !self.body.is_empty() {
            form.push(("Body", &self.body));
        }
        for url in &self.media_urls {
            form.push(("MediaUrl", url));
        }
        if let Some(cb) = &self.status_callback {
            form.push(("StatusCallback", cb));
        }
        form.extend(self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        form
    }

    /// The form, encoded as the request body.
    fn encoded(&self) -> String {
        form_body(self.form())
    }
}

/// Pairs encoded as `application/x-www-form-urlencoded` (request bodies and query strings).
fn form_body<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    url::form_urlencoded::Serializer::new(String::with_capacity(256))
        .extend_pairs(pairs)
        .finish()
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Clone)]
pub struct TwilioClient {
    http: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    request_timeout: Duration,
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

const USER_AGENT: &str = concat!("smsgw/", env!("CARGO_PKG_VERSION"));

impl TwilioClient {
    pub fn new(request_timeout: Duration) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        // Never a redirect followed, never a request replayed: only the outbox decides whether a
        // message is sent again (after reconciling). hyper retries only a request that never
        // started on a pooled connection the server had just closed.
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(1024)
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(connector);
        Self {
            http,
            request_timeout,
        }
    }

    /// One request with the account's credentials (a form body if given), answer read whole (at
    /// most `limit` bytes), all within the request timeout.
    async fn exchange<U>(
        &self,
        method: Method,
        uri: U,
        account: &Account,
        form: Option<String>,
        limit: usize,
    ) -> Result<Answer, HttpError>
    where
        Uri: TryFrom<U>,
        <Uri as TryFrom<U>>::Error: Into<http::Error>,
    {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, account.authorization.clone())
            .header(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        if form.is_some() {
            request = request.header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
        }
        let request = request.body(Full::new(Bytes::from(form.unwrap_or_default())))?;
        let work = async {
            let resp = self.http.request(request).await.map_err(|e| {
                if e.is_connect() {
                    HttpError::Connect(with_causes(&e))
                } else {
                    HttpError::Exchange(with_causes(&e))
                }
            })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        HttpError::TooLarge(limit)
                    } else {
                        HttpError::Body(with_causes(e.as_ref()))
                    }
                })?
                .to_bytes();
            Ok(Answer {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.request_timeout, work)
            .await
            .map_err(|_| HttpError::Timeout(self.request_timeout))?
    }

    pub async fn send(&self, account: &Account, request: &SendRequest) -> SendOutcome {
        let sent = self
            .exchange(
                Method::POST,
                account.messages_url.clone(),
                account,
                Some(request.encoded()),
                MAX_ANSWER_BYTES,
            )
            .await;
        let answer = match sent {
            Ok(a) => a,
            Err(e) => {
                return SendOutcome::Retry {
                    after: None,
                    reason: format!("cannot reach Twilio: {e}"),
                    in_doubt: e.maybe_sent(),
                };
            }
        };
        let status = answer.status;
        let after = retry_after(&answer.headers);
        match status {
            200..=299 => match serde_json::from_slice::<Accepted>(&answer.body) {
                Ok(m) => SendOutcome::Created(m),
                Err(e) => SendOutcome::Retry {
                    after: None,
                    reason: format!("Twilio answered {status} with unreadable JSON: {e}"),
                    in_doubt: true,
                },
            },
            429 => SendOutcome::Retry {
                after,
                reason: "Twilio: too many requests (20429)".into(),
                in_doubt: false,
            },
            400..=499 => SendOutcome::Rejected(ApiError::parse(status, &answer.body)),
            _ => SendOutcome::Retry {
                after,
                reason: format!("Twilio answered {status}"),
                in_doubt: true,
            },
        }
    }

    /// A request whose non-2xx answer becomes [`ClientError::Api`].
    async fn call(
        &self,
        method: Method,
        account: &Account,
        url: &str,
        form: Option<String>,
        limit: usize,
    ) -> Result<Answer, ClientError> {
        let answer = self
            .exchange(method, url, account, form, limit)
            .await
            .map_err(|source| ClientError::Http {
                url: url.into(),
                source,
            })?;
        if (200..300).contains(&answer.status) {
            return Ok(answer);
        }
        Err(ClientError::Api {
            url: url.into(),
            error: ApiError::parse(answer.status, &answer.body),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        account: &Account,
        url: &str,
    ) -> Result<T, ClientError> {
        let answer = self
            .call(Method::GET, account, url, None, MAX_ANSWER_BYTES)
            .await?;
        serde_json::from_slice(&answer.body).map_err(|source| ClientError::Decode {
            url: url.into(),
            source,
        })
    }

    /// Messages to `to` (and from `from`, if given), newest first, created at or after `since`
    /// (Unix seconds), following `next_page_uri` up to `max_pages`. No `DateSent` filter:
    /// messages still queued have no send date.
    pub async fn list_messages(
        &self,
        account: &Account,
        to: &str,
        from: Option<&str>,
        since: i64,
        max_pages: usize,
    ) -> Result<Vec<MessageResource>, ClientError> {
        let mut query = vec![("To", to), ("PageSize", "100")];
        if let Some(f) = from {
            query.push(("From", f));
        }
        let mut url = format!("{}?{}", account.url("Messages.json"), form_body(query));
        let mut out = Vec::new();
        for _ in 0..max_pages {
            let page: MessageList = self.get_json(account, &url).await?;
            let reached_older = page
                .messages
                .iter()
                .any(|m| created_secs(m).is_some_and(|t| t < since));
            out.extend(
                page.messages
                    .into_iter()
                    .filter(|m| created_secs(m).is_none_or(|t| t >= since)),
            );
            match page.next_page_uri {
                Some(next) if !next.is_empty() && !reached_older => {
                    url = format!("{}{next}", account.api_base)
                }
                _ => break,
            }
        }
        Ok(out)
    }

    pub async fn incoming_numbers(
        &self,
        account: &Account,
    ) -> Result<Vec<IncomingNumber>, ClientError> {
        let mut url = format!("{}?PageSize=100", account.url("IncomingPhoneNumbers.json"));
        let mut out = Vec::new();
        for _ in 0..100 {
            let page: NumberList = self.get_json(account, &url).await?;
            out.extend(page.incoming_phone_numbers);
            match page.next_page_uri {
                Some(next) if !next.is_empty() => url = format!("{}{next}", account.api_base),
                _ => break,
            }
        }
        Ok(out)
    }

    pub async fn set_sms_url(
        &self,
        account: &Account,
        number_sid: &str,
        sms_url: &str,
    ) -> Result<(), ClientError> {
        let url = account.url(&format!("IncomingPhoneNumbers/{number_sid}.json"));
        let form = form_body([("SmsUrl", sms_url), ("SmsMethod", "POST")]);
        self.call(Method::POST, account, &url, Some(form), MAX_ANSWER_BYTES)
            .await?;
        Ok(())
    }

    /// Fetches media Twilio stores for an inbound MMS (with the account's credentials: Twilio can
    /// require HTTP auth on media). Refuses bodies over `max_bytes`.
    pub async fn fetch_media(
        &self,
        account: &Account,
        url: &str,
        max_bytes: usize,
    ) -> Result<(String, Vec<u8>), ClientError> {
        let answer = match self.call(Method::GET, account, url, None, max_bytes).await {
            Err(ClientError::Http {
                source: HttpError::TooLarge(_),
                ..
            }) => {
                return Err(ClientError::Api {
                    url: url.into(),
                    error: ApiError {
                        http_status: 413,
                        code: 413,
                        message: format!("media larger than {max_bytes} bytes"),
                    },
                })
            }
            other => other?,
        };
        let content_type = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_string();
        Ok((content_type, answer.body.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_error_shapes() {
        let legacy = br#"{"code": 21211, "message": "The 'To' number is not valid.", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}"#;
        assert_eq!(
            ApiError::parse(400, legacy),
            ApiError {
                http_status: 400,
                code: 21211,
                message: "The 'To' number is not valid.".into()
            }
        );
        let rfc9457 = br#"{"type": "https://www.twilio.com/docs/errors/20429", "title": "Too Many Requests", "status": 429, "code": 20429, "detail": "slow down"}"#;
        assert_eq!(ApiError::parse(429, rfc9457).code, 20429);
        assert_eq!(ApiError::parse(429, rfc9457).message, "slow down");
        assert_eq!(ApiError::parse(502, b"<html>").code, 502);
    }

    fn account_at(addr: std::net::SocketAddr) -> Account {
        Account::new(
            &format!("http://{addr}"),
            "AC00000000000000000000000000000000",
            "AC00000000000000000000000000000000",
            &Secret::new("token"),
        )
    }

    fn hello() -> SendRequest {
        SendRequest {
            to: "+15551234567".into(),
            from: Some("+15017122661".into()),
            body: "hi".into(),
            ..SendRequest::default()
        }
    }

    #[tokio::test]
    async fn nothing_listening_is_retried_without_doubt() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = TwilioClient::new(Duration::from_secs(2));
        match client.send(&account_at(addr), &hello()).await {
            SendOutcome::Retry { in_doubt, .. } => assert!(!in_doubt, "nothing was sent"),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn no_answer_in_time_is_in_doubt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Takes the request and never answers.
        let server = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(conn);
        });
        let client = TwilioClient::new(Duration::from_millis(300));
        match client.send(&account_at(addr), &hello()).await {
            SendOutcome::Retry {
                in_doubt, reason, ..
            } => {
                assert!(in_doubt, "the request may have been processed");
                assert!(reason.contains("within"), "{reason}");
            }
            other => panic!("expected a retry, got {other:?}"),
        }
        server.abort();
    }

    #[test]
    fn form_repeats_media_url() {
        let r = SendRequest {
            to: "+15551234567".into(),
            from: Some("+15017122661".into()),
            body: "hi".into(),
            media_urls: vec!["https://a/1".into(), "https://a/2".into()],
            ..SendRequest::default()
        };
        let form = r.form();
        assert_eq!(form.iter().filter(|(k, _)| *k == "MediaUrl").count(), 2);
        assert!(!form.iter().any(|(k, _)| *k == "MessagingServiceSid"));
    }
}
