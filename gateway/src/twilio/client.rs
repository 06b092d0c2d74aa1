//! The Twilio REST client: Messages (send, list), IncomingPhoneNumbers (list, set SmsUrl), media.

use crate::config::Secret;
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
    authorization: reqwest::header::HeaderValue,
    /// Parsed once: parsing it cost more than the rest of building a request.
    messages_url: reqwest::Url,
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
        let mut authorization = reqwest::header::HeaderValue::from_str(&format!("Basic {basic}"))
            .expect("base64 is a valid header value");
        authorization.set_sensitive(true);
        // The configuration checked api_base as an http(s) URL, and the rest is plain ASCII.
        let messages_url =
            reqwest::Url::parse(&account_url(api_base, account_sid, "Messages.json"))
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

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach Twilio at {url}: {source}")]
    Http { url: String, source: reqwest::Error },
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
        url::form_urlencoded::Serializer::new(String::with_capacity(256))
            .extend_pairs(self.form())
            .finish()
    }
}

#[derive(Clone)]
pub struct TwilioClient {
    http: reqwest::Client,
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

impl TwilioClient {
    pub fn new(request_timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            // The API never redirects; a POST must not be replayed elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            // Only the outbox decides whether a message is sent again (after reconciling), never
            // the HTTP layer; this also spares a copy of every request kept for a replay.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .user_agent(concat!("smsgw/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a TLS backend is compiled in");
        Self { http }
    }

    pub async fn send(&self, account: &Account, request: &SendRequest) -> SendOutcome {
        let sent = self
            .http
            .post(account.messages_url.clone())
            .header(
                reqwest::header::AUTHORIZATION,
                account.authorization.clone(),
            )
            .header(
                reqwest::header::CONTENT_TYPE,
                reqwest::header::HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .body(request.encoded())
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                // A connect error means nothing reached Twilio; anything later may have.
                let in_doubt = !e.is_connect() && !e.is_builder();
                return SendOutcome::Retry {
                    after: None,
                    reason: format!("cannot reach Twilio: {e}"),
                    in_doubt,
                };
            }
        };
        let status = resp.status().as_u16();
        let after = retry_after(resp.headers());
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return SendOutcome::Retry {
                    after: None,
                    reason: format!("Twilio's answer was cut off: {e}"),
                    in_doubt: true,
                }
            }
        };
        match status {
            200..=299 => match serde_json::from_slice::<Accepted>(&body) {
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
            400..=499 => SendOutcome::Rejected(ApiError::parse(status, &body)),
            _ => SendOutcome::Retry {
                after,
                reason: format!("Twilio answered {status}"),
                in_doubt: true,
            },
        }
    }

    /// A GET with the account's credentials; a non-2xx answer becomes [`ClientError::Api`].
    async fn authed_get(
        &self,
        account: &Account,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let http_err = |source| ClientError::Http {
            url: url.into(),
            source,
        };
        let resp = self
            .http
            .get(url)
            .header(
                reqwest::header::AUTHORIZATION,
                account.authorization.clone(),
            )
            .send()
            .await
            .map_err(http_err)?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        Err(ClientError::Api {
            url: url.into(),
            error: ApiError::parse(status, &body),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        account: &Account,
        url: &str,
    ) -> Result<T, ClientError> {
        let resp = self.authed_get(account, url).await?;
        let body = resp.bytes().await.map_err(|source| ClientError::Http {
            url: url.into(),
            source,
        })?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
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
        let mut url = account.messages_url.clone();
        url.query_pairs_mut().extend_pairs(&query);
        let mut url = url.to_string();
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
        let resp = self
            .http
            .post(&url)
            .header(
                reqwest::header::AUTHORIZATION,
                account.authorization.clone(),
            )
            .form(&[("SmsUrl", sms_url), ("SmsMethod", "POST")])
            .send()
            .await
            .map_err(|source| ClientError::Http {
                url: url.clone(),
                source,
            })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let body = resp.bytes().await.unwrap_or_default();
        Err(ClientError::Api {
            url,
            error: ApiError::parse(status, &body),
        })
    }

    /// Fetches media Twilio stores for an inbound MMS (with the account's credentials: Twilio can
    /// require HTTP auth on media). Refuses bodies over `max_bytes`.
    pub async fn fetch_media(
        &self,
        account: &Account,
        url: &str,
        max_bytes: usize,
    ) -> Result<(String, Vec<u8>), ClientError> {
        let mut resp = self.authed_get(account, url).await?;
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_string();
        let mut data = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|source| ClientError::Http {
            url: url.into(),
            source,
        })? {
            if data.len() + chunk.len() > max_bytes {
                return Err(ClientError::Api {
                    url: url.into(),
                    error: ApiError {
                        http_status: 413,
                        code: 413,
                        message: format!("media larger than {max_bytes} bytes"),
                    },
                });
            }
            data.extend_from_slice(&chunk);
        }
        Ok((content_type, data))
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
