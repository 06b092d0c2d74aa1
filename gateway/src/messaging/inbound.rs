//! Inbound: Twilio's signed webhook → checks → inbox (durably, once) → 200 TwiML; status
//! callbacks; media smsgw serves.

use super::{now_ms, Messaging, Owner, MESSAGE_ID_PARAM};
use crate::metrics::OutcomeLabel;
use crate::store::{Direction, Kind, NewMessage, Recorded, Store};
use crate::twilio::signature;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use smsgw_rules::inbound::{route_inbound, Decision, Target};
use smsgw_rules::optout::{self, Keyword};
use smsgw_rules::{MessageStatus, E164};
use std::sync::Arc;

/// Decoded form parameters, in order, repeated keys kept.
type Params = Vec<(String, String)>;

const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>";

/// Which Twilio-facing route a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Sms,
    Status,
}

impl Hook {
    fn path(self) -> &'static str {
        match self {
            Self::Sms => "sms",
            Self::Status => "status",
        }
    }
}

fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl Messaging {
    fn refuse(
        &self,
        outcome: &'static str,
        status: StatusCode,
        why: &str,
        source: &str,
    ) -> Response {
        self.metrics
            .webhooks
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        tracing::warn!(%source, reason = why, "refused a webhook");
        (status, format!("{why}\n")).into_response()
    }

    /// Checks a request to `/twilio/{sms|status}/{token}`: the token names a configuration, the
    /// signature is Twilio's over the URL as configured (never the Host header), AccountSid is
    /// that configuration's. Returns the configuration and the form parameters.
    fn verify_hook(
        &self,
        hook: Hook,
        token: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
        source: &str,
    ) -> Result<(usize, Params), Box<Response>> {
        let Some(index) = self.config_for_token(token) else {
            return Err(Box::new(self.refuse(
                "unknown_token",
                StatusCode::NOT_FOUND,
                "unknown webhook token",
                source,
            )));
        };
        let sms = &self.settings.sms[index];
        let mut url = format!(
            "{}/twilio/{}/{token}",
            self.settings.gateway.public_url,
            hook.path()
        );
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let params: Vec<(String, String)> = if is_json {
            Vec::new()
        } else {
            url::form_urlencoded::parse(body).into_owned().collect()
        };
        let sig = headers
            .get("X-Twilio-Signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let json_body = is_json.then_some(body);
        if sig.is_empty()
            || !signature::validate(sms.auth_token.expose(), &url, &params, json_body, sig)
        {
            return Err(Box::new(self.refuse(
                "bad_signature",
                StatusCode::FORBIDDEN,
                "missing or wrong X-Twilio-Signature",
                source,
            )));
        }
        let params = if is_json {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            v.as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    let value = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    (k.clone(), value)
                })
                .collect()
        } else {
            params
        };
        if get(&params, "AccountSid") != Some(sms.account_sid.as_str()) {
            return Err(Box::new(self.refuse(
                "wrong_account",
                StatusCode::FORBIDDEN,
                "AccountSid is not this configuration's",
                source,
            )));
        }
        Ok((index, params))
    }

    pub async fn on_status_request(
        &self,
        token: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
        source: &str,
    ) -> Response {
        let params = match self.verify_hook(Hook::Status, token, query, headers, body, source) {
            Ok((_, p)) => p,
            Err(r) => return *r,
        };
        self.metrics
            .webhooks
            .get_or_create(&OutcomeLabel { outcome: "status" })
            .inc();
        // Our message id, from the URL we gave Twilio (the signature covers it).
        let id = query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == MESSAGE_ID_PARAM)
                .and_then(|(_, v)| v.parse().ok())
        });
        self.on_status(&params, id).await;
        StatusCode::NO_CONTENT.into_response()
    }

    /// "A message comes in": validate, store once, answer 200 with empty TwiML, deliver after.
    pub async fn on_sms_webhook(
        self: &Arc<Self>,
        token: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
        source: &str,
    ) -> Response {
        let (index, params) = match self.verify_hook(Hook::Sms, token, query, headers, body, source)
        {
            Ok(v) => v,
            Err(r) => return *r,
        };
        let sms = &self.settings.sms[index];
        let (Some(sid), Some(from), Some(to)) = (
            get(&params, "MessageSid"),
            get(&params, "From"),
            get(&params, "To"),
        ) else {
            return self.refuse(
                "bad_request",
                StatusCode::BAD_REQUEST,
                "MessageSid, From and To are required",
                source,
            );
        };
        let Ok(did) = E164::parse(to) else {
            return self.refuse(
                "bad_request",
                StatusCode::BAD_REQUEST,
                "To is not an E.164 number",
                source,
            );
        };
        if from.is_empty() || from.len() > 64 {
            return self.refuse(
                "bad_request",
                StatusCode::BAD_REQUEST,
                "From is empty or too long",
                source,
            );
        }
        self.last_webhook
            .write()
            .expect("lock")
            .insert(sms.name.clone(), std::time::SystemTime::now());
        let text = get(&params, "Body").unwrap_or_default();
        let keyword = get(&params, "OptOutType")
            .and_then(optout::from_opt_out_type)
            .or_else(|| optout::classify(text));
        let media: Vec<String> = (0..get(&params, "NumMedia")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
            .min(10))
            .filter_map(|i| get(&params, &format!("MediaUrl{i}")).map(str::to_string))
            .collect();
        let now = now_ms();
        let messages = match self
            .inbound_rows(index, &did, from, text, keyword, media, sid, now)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "cannot check a mailbox");
                return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
            }
        };
        let mut keys = vec![format!("sid:{sid}")];
        if let Some(t) = headers
            .get("I-Twilio-Idempotency-Token")
            .and_then(|v| v.to_str().ok())
        {
            keys.push(format!("idem:{t}"));
        }
        let mut messages = messages;
        if keyword == Some(Keyword::Help) {
            if let Some(reply) = sms.help_reply.clone() {
                messages.push(self.reply_row(index, &did, from, reply));
            }
        }
        // The opt-out is written in the same transaction as the message: a crash cannot keep
        // one without the other (a retried webhook would be a duplicate and change nothing).
        let opt_out = keyword
            .filter(|k| *k != Keyword::Help)
            .map(|k| (from.to_string(), did.to_string(), k == Keyword::OptOut));
        let owners: Vec<Owner> = messages
            .iter()
            .filter(|m| m.direction == Direction::Inbound && m.next_attempt_at.is_some())
            .filter_map(|m| Owner::from_columns(m.extension.clone(), m.trunk.clone()))
            .collect();
        let forwards = messages.iter().any(|m| m.direction == Direction::Outbound);
        // The rows to deliver go to their deliverers as they commit, in commit order.
        let hand_over: Vec<Option<(Owner, NewMessage)>> = messages
            .iter()
            .map(|m| {
                (m.direction == Direction::Inbound && m.next_attempt_at.is_some())
                    .then(|| Owner::from_columns(m.extension.clone(), m.trunk.clone()))
                    .flatten()
                    .map(|o| (o, m.clone()))
            })
            .collect();
        let inboxes = self.inboxes.clone();
        let on_commit: crate::store::OnCommit = Box::new(move |ids: &[i64]| {
            for (id, row) in ids.iter().zip(hand_over) {
                if let Some((owner, new)) = row {
                    inboxes.hand_over(owner, crate::store::Message::stored(*id, new));
                }
            }
        });
        match self
            .store
            .record_inbound(keys, messages, opt_out.clone(), on_commit)
            .await
        {
            Ok(Recorded::Duplicate) => {
                self.metrics
                    .webhooks
                    .get_or_create(&OutcomeLabel {
                        outcome: "duplicate",
                    })
                    .inc();
                return twiml();
            }
            Ok(Recorded::New(_)) => {}
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "cannot store an inbound message; Twilio will see 503");
                return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response();
            }
        }
        self.metrics
            .webhooks
            .get_or_create(&OutcomeLabel {
                outcome: "accepted",
            })
            .inc();
        self.count(Direction::Inbound, MessageStatus::Received);
        if let Some((remote, sender, opted_out)) = opt_out {
            self.remember_opt_out(remote, sender, opted_out);
        }
        for owner in owners {
            self.kick_delivery(owner);
        }
        if forwards {
            self.outbox_kick.notify_one();
        }
        twiml()
    }

    /// The rows one inbound SMS becomes: one per target extension or trunk, an outbound row per
    /// forward, or one unroutable/dropped row.
    #[allow(clippy::too_many_arguments)]
    async fn inbound_rows(
        &self,
        index: usize,
        did: &E164,
        from: &str,
        text: &str,
        keyword: Option<Keyword>,
        media: Vec<String>,
        sid: &str,
        now: i64,
    ) -> Result<Vec<NewMessage>, crate::store::StoreError> {
        let sms = &self.settings.sms[index];
        let owner_of = |d: &E164| {
            self.settings
                .extensions
                .iter()
                .find(|e| e.dids.contains(d))
                .map(|e| e.id.clone())
        };
        let decision = route_inbound(&self.settings.inbound_rules, &sms.name, did, from, owner_of);
        let targets: Vec<Target> = match decision {
            Decision::Rule { targets, .. } => targets,
            Decision::Owner(ext) => vec![Target::Extension(ext)],
            Decision::Unroutable => vec![],
        };
        let kind = match keyword {
            Some(Keyword::OptOut) => Kind::OptOut,
            Some(Keyword::OptIn) => Kind::OptIn,
            Some(Keyword::Help) => Kind::Help,
            None => Kind::Sms,
        };
        let segments = smsgw_rules::segments::count(text).count as u32;
        let ttl = self.settings.messaging.inbox_ttl_secs as i64 * 1000;
        let row = |extension: Option<String>,
                   trunk: Option<String>,
                   status: MessageStatus,
                   queued: bool| NewMessage {
            direction: Direction::Inbound,
            kind,
            sms_config: sms.name.clone(),
            extension,
            trunk,
            remote: from.to_string(),
            sender: did.to_string(),
            body: text.to_string(),
            media: media.clone(),
            twilio_sid: Some(sid.to_string()),
            status,
            segments,
            now,
            attempts: 0,
            next_attempt_at: queued.then_some(now),
            expires_at: Some(now + ttl),
            in_doubt: false,
            meta: serde_json::json!({}),
            lease: 0,
        };
        if targets.is_empty() {
            return Ok(vec![row(None, None, MessageStatus::Unroutable, false)]);
        }
        let mut rows = Vec::new();
        for target in targets {
            match target {
                Target::Extension(ext) => {
                    let cap = self.settings.messaging.max_pending_per_extension;
                    let owner = Owner::Extension(ext.to_string());
                    let mailbox_full = !self.inboxes.surely_below(&owner, cap)
                        && self.store.pending_count(ext.to_string()).await? >= cap;
                    if mailbox_full {
                        let mut full =
                            row(Some(ext.to_string()), None, MessageStatus::Failed, false);
                        full.meta = serde_json::json!({"error": "mailbox full"});
                        rows.push(full);
                    } else {
                        rows.push(row(
                            Some(ext.to_string()),
                            None,
                            MessageStatus::Pending,
                            true,
                        ));
                    }
                }
                Target::Trunk(t) => rows.push(row(None, Some(t), MessageStatus::Pending, true)),
                Target::Drop => rows.push(row(None, None, MessageStatus::Dropped, false)),
                Target::Forward(number) => {
                    let mut fwd = row(None, None, MessageStatus::Stored, true);
                    fwd.direction = Direction::Outbound;
                    fwd.remote = number.to_string();
                    fwd.body = format!("From {from}: {text}");
                    fwd.twilio_sid = None;
                    fwd.expires_at = Some(now + i64::from(sms.validity_secs) * 1000);
                    rows.push(fwd);
                }
            }
        }
        Ok(rows)
    }

    /// An automatic SMS back (the HELP reply), as an outbox row.
    fn reply_row(&self, index: usize, did: &E164, to: &str, text: String) -> NewMessage {
        let sms = &self.settings.sms[index];
        let now = now_ms();
        NewMessage {
            direction: Direction::Outbound,
            kind: Kind::Notice,
            sms_config: sms.name.clone(),
            extension: None,
            trunk: None,
            remote: to.to_string(),
            sender: did.to_string(),
            segments: smsgw_rules::segments::count(&text).count as u32,
            body: text,
            media: vec![],
            twilio_sid: None,
            status: MessageStatus::Stored,
            now,
            attempts: 0,
            next_attempt_at: Some(now),
            expires_at: Some(now + i64::from(sms.validity_secs) * 1000),
            in_doubt: false,
            meta: serde_json::json!({}),
            lease: 0,
        }
    }

    /// Media smsgw serves under `public_url` (outbound MMS for Twilio to fetch, inbound MMS links
    /// for phones): unguessable tokens that expire.
    pub async fn media_response(&self, token: &str) -> Response {
        match self.store.media(token.to_string(), now_ms()).await {
            Ok(Some((content_type, data))) => {
                ([(header::CONTENT_TYPE, content_type)], data).into_response()
            }
            Ok(None) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response(),
        }
    }
}

fn twiml() -> Response {
    ([(header::CONTENT_TYPE, "text/xml")], EMPTY_TWIML).into_response()
}
