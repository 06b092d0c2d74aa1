//! Outbound: a phone's (or the API's) text → rules → policy → outbox → Twilio, exactly once.

use super::{now_ms, Messaging, Owner, MESSAGE_ID_PARAM};
use crate::config::AnswerMode;
use crate::content::{Content, Outgoing};
use crate::metrics::CodeLabel;
use crate::store::{Advance, Direction, Kind, Message, NewMessage, StatusCallback, Store, Update};
use crate::twilio::{SendOutcome, SendRequest};
use smsgw_rules::outbound::{
    choose_sender, route, RouteError, Sender, SenderChoice, SenderOptions, Source,
};
use smsgw_rules::{country, dial, split, MessageStatus, E164};
use smsgw_sip::uri::SipUri;
use smsgw_sip::{Response, ServerTx};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a claimed message is hidden from other senders; longer than any single attempt
/// (request timeout 15 s plus a short pacing wait).
pub const LEASE_MS: i64 = 60_000;
/// Longest a request to Twilio can take (its timeout) plus a margin: a lease with more left than
/// this cannot run out while the request is in flight.
const REQUEST_BUDGET_MS: i64 = 20_000;
/// Pacing waits longer than this put the message back in the outbox instead of holding a task.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedSource {
    Extension(String),
    Trunk(String),
}

impl OwnedSource {
    fn as_source(&self) -> Source<'_> {
        match self {
            Self::Extension(e) => Source::Extension(e),
            Self::Trunk(t) => Source::Trunk(t),
        }
    }

    fn owner(&self) -> Owner {
        match self {
            Self::Extension(e) => Owner::Extension(e.clone()),
            Self::Trunk(t) => Owner::Trunk(t.clone()),
        }
    }
}

/// A refusal before anything was stored, with the SIP status that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: String,
    pub retry_after: Option<u64>,
}

fn refused(status: u16, reason: impl Into<String>) -> Refused {
    Refused {
        status,
        reason: reason.into(),
        retry_after: None,
    }
}

/// The result of one attempt to hand a message to Twilio.
#[derive(Debug, Clone)]
pub enum Outcome {
    Accepted,
    /// Twilio refused it for good.
    Rejected {
        code: i64,
        message: String,
    },
    /// It stays in the outbox (retry, pacing, or Twilio unreachable).
    Queued,
    Expired,
}

/// What is left to record once Twilio took a message.
struct Taken {
    id: i64,
    status: MessageStatus,
    sid: Option<String>,
}

/// Per-extension rate limit (per minute) and daily quota; the maps hold one entry per extension
/// that has sent, so they are bounded by the configuration.
#[derive(Default)]
pub struct Limits {
    minute: Mutex<HashMap<String, (i64, u32)>>,
    day: Mutex<HashMap<String, (i64, u64)>>,
}

/// A final response whose reason phrase says why: "Not Found (no outbound rule matches …)".
fn explained(req: &smsgw_sip::Request, status: u16, why: &str) -> Response {
    Response::with_reason(
        req,
        status,
        &format!("{} ({why})", smsgw_sip::message::reason_phrase(status)),
    )
}

/// The status of a message Twilio has just taken: what it said, unless that is already final
/// (a final status comes with its callback, which also tells the phone).
fn accepted_status(twilio: Option<&str>) -> MessageStatus {
    twilio
        .and_then(MessageStatus::from_twilio)
        .filter(|s| !s.is_final())
        .unwrap_or(MessageStatus::Queued)
}

/// Maps a Twilio refusal to what the phone hears.
pub fn sip_status_for(code: i64) -> u16 {
    match code {
        21211 => 484,
        21612 => 404,
        21610 | 21408 | 21212 | 21606 => 403,
        21614 => 488,
        21617 => 413,
        21611 => 503,
        _ => 400,
    }
}

impl Messaging {
    /// A MESSAGE from an authenticated extension or a trunk. Answers 503 at once when too much is
    /// in flight, rather than queueing without bound.
    pub fn on_sip_message(self: &Arc<Self>, tx: ServerTx, source: OwnedSource) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let resp = Response::with_reason(
                &tx.request,
                503,
                "Service Unavailable (too many messages in flight)",
            )
            .header("Retry-After", "5");
            self.respond(tx, resp);
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            this.handle_sip_message(tx, source).await;
        });
    }

    async fn handle_sip_message(self: Arc<Self>, tx: ServerTx, source: OwnedSource) {
        let req = &tx.request;
        let content = crate::content::parse(
            req.headers.get("Content-Type"),
            &req.body,
            self.settings.messaging.max_media_bytes,
        );
        let out = match content {
            Ok(Content::Ignore) => {
                let resp = Response::to(req, 200);
                return self.respond(tx, resp);
            }
            Ok(Content::Text(out)) => out,
            Err(r) => {
                let mut resp = explained(req, r.status, &r.reason);
                if r.status == 415 {
                    resp.headers.push("Accept", crate::content::ACCEPT);
                }
                return self.respond(tx, resp);
            }
        };
        let dialed = SipUri::parse(&req.uri)
            .and_then(|u| u.user)
            .unwrap_or_default();
        let answer = self.answer_mode(&source);
        let submitted = self.submit(&source, &dialed, out).await;
        let messages = match submitted {
            Ok(m) => m,
            Err(r) => {
                let mut resp = explained(req, r.status, &r.reason);
                if let Some(after) = r.retry_after {
                    resp.headers.push("Retry-After", after.to_string());
                }
                return self.respond(tx, resp);
            }
        };
        match answer {
            AnswerMode::OnStore => {
                let resp = Response::to(&tx.request, 202);
                self.respond(tx, resp);
                self.send_in_order(messages, None, true).await;
            }
            AnswerMode::AfterTwilio => {
                // Sending runs in this task: the answer goes out at the first outcome or when
                // the window closes, whichever comes first, and sending goes on after it.
                let (reply, mut waiting) = oneshot::channel();
                let sending = self.send_in_order(messages, Some(reply), true);
                tokio::pin!(sending);
                let window = tokio::time::sleep(self.settings.messaging.answer_window);
                tokio::pin!(window);
                let mut finished = None;
                let first = tokio::select! {
                    outcome = &mut waiting => outcome.ok(),
                    done = &mut sending => {
                        let first = done.as_ref().map(|(_, o)| o.clone());
                        finished = Some(done);
                        first
                    }
                    () = &mut window => None,
                };
                let resp = match first {
                    Some(Outcome::Rejected { code, message }) => {
                        let status = sip_status_for(code);
                        explained(&tx.request, status, &format!("Twilio {code}: {message}")).header(
                            "Warning",
                            format!("399 smsgw \"Twilio {code}: {}\"", message.replace('"', "'")),
                        )
                    }
                    // Accepted, or still trying: the outbox has it either way.
                    _ => Response::to(&tx.request, 202),
                };
                // The phone heard the refusal only if the answer carried it; otherwise it gets a
                // notice once the first part's outcome is known (no race with the window).
                let told_phone = resp.code >= 300;
                self.respond(tx, resp);
                let done = match finished {
                    Some(done) => done,
                    None => sending.await,
                };
                if let Some((id, Outcome::Rejected { .. })) = done {
                    if !told_phone {
                        self.notify_outcome(&id, false).await;
                    }
                }
            }
        }
    }

    /// Answers a MESSAGE and counts the answer, like every other SIP response.
    fn respond(&self, tx: ServerTx, resp: Response) {
        self.metrics.respond(tx, resp);
    }

    fn answer_mode(&self, source: &OwnedSource) -> AnswerMode {
        let own = match source {
            OwnedSource::Extension(e) => self
                .settings
                .extensions
                .iter()
                .find(|x| x.id.as_str() == e)
                .and_then(|x| x.answer),
            OwnedSource::Trunk(t) => self
                .settings
                .trunks
                .iter()
                .find(|x| &x.name == t)
                .and_then(|x| x.answer),
        };
        own.unwrap_or(self.settings.messaging.answer)
    }

    /// Sends the parts of one text one after the other; the first outcome goes to `reply` and
    /// is returned. Refusals are reported with a notice when `notify` is on, except the first
    /// part's when `reply` is given: whoever waits on `reply` decides that one.
    async fn send_in_order(
        &self,
        messages: Vec<Message>,
        mut reply: Option<oneshot::Sender<Outcome>>,
        notify: bool,
    ) -> Option<(i64, Outcome)> {
        let mut first = None;
        for m in messages {
            let (outcome, taken) = self.send_to_twilio(m.clone()).await;
            let decided_by_caller = match reply.take() {
                Some(tx) => {
                    let _ = tx.send(outcome.clone());
                    true
                }
                None => false,
            };
            if let Some(taken) = taken {
                self.record_taken(taken).await;
            }
            if matches!(outcome, Outcome::Rejected { .. }) && notify && !decided_by_caller {
                self.notify_outcome(&m.id, false).await;
            }
            first.get_or_insert((m.id, outcome));
        }
        first
    }

    /// For the admin API: submits, sends at once, and returns the messages as they now stand.
    pub async fn submit_and_send(
        &self,
        source: &OwnedSource,
        dialed: &str,
        out: Outgoing,
    ) -> Result<Vec<Message>, Refused> {
        let messages = self.submit(source, dialed, out).await?;
        let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
        // The caller sees the outcome in the returned rows, so failures need no notice.
        self.send_in_order(messages, None, false).await;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Ok(Some(m)) = self.store.message(id).await {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Checks, stores and returns the messages to send (one per part of a long text).
    pub async fn submit(
        &self,
        source: &OwnedSource,
        dialed: &str,
        out: Outgoing,
    ) -> Result<Vec<Message>, Refused> {
        let digits = dial::normalize_dialed(dialed).map_err(|e| refused(484, e.to_string()))?;
        let r =
            route(&self.settings.outbound_rules, source.as_source(), &digits).map_err(
                |e| match e {
                    RouteError::NoRule { .. } => refused(404, e.to_string()),
                    RouteError::NotE164 { .. } => refused(484, e.to_string()),
                },
            )?;
        let sms_index = self
            .sms_index(r.sms)
            .ok_or_else(|| refused(500, "rule names an unknown SMS configuration"))?;
        let sms = &self.settings.sms[sms_index];
        let to = r.to.clone();
        let ext_dids: &[E164] = match source {
            OwnedSource::Extension(e) => self
                .settings
                .extensions
                .iter()
                .find(|x| x.id.as_str() == e)
                .map_or(&[], |x| x.dids.as_slice()),
            OwnedSource::Trunk(_) => &[],
        };
        let reply_did = if *r.sender == SenderChoice::Extension && ext_dids.len() > 1 {
            let since = now_ms() - self.settings.messaging.reply_window_days as i64 * 86_400_000;
            let dids = ext_dids.iter().map(|d| d.to_string()).collect();
            match self
                .store
                .last_inbound_did(to.to_string(), dids, since)
                .await
            {
                Ok(d) => d.and_then(|d| E164::parse(&d).ok()),
                Err(e) => return Err(refused(500, format!("store: {e}"))),
            }
        } else {
            None
        };
        let options = SenderOptions {
            dids: &sms.dids,
            sender_id: sms.sender_id.as_ref(),
            messaging_service_sid: sms.messaging_service_sid.as_deref(),
        };
        let sender = choose_sender(
            r.sender,
            source.as_source(),
            ext_dids,
            reply_did.as_ref(),
            options,
        )
        .map_err(|e| refused(403, e.to_string()))?;
        self.check_policy(source, sms_index, &to, &sender).await?;

        let texts = if out.text.chars().count() > split::TWILIO_MAX_BODY {
            if !self.settings.messaging.split_long_bodies {
                return Err(refused(413, "the text is longer than 1600 characters"));
            }
            split::split_body(&out.text, split::TWILIO_MAX_BODY)
        } else {
            vec![out.text.clone()]
        };
        let now = now_ms();
        let mut media_urls = Vec::new();
        for m in &out.media {
            let token = crate::store::sqlite::new_token();
            let expires = now + self.settings.messaging.media_ttl_secs as i64 * 1000;
            self.store
                .put_media(
                    token.clone(),
                    m.content_type.clone(),
                    m.data.to_vec(),
                    expires,
                )
                .await
                .map_err(|e| refused(500, format!("store: {e}")))?;
            media_urls.push(format!(
                "{}/media/{token}",
                self.settings.gateway.public_url
            ));
        }
        let (extension, trunk) = source.owner().columns();
        let meta = match &out.imdn {
            Some(i) => {
                serde_json::json!({"imdn": {"message_id": i.message_id, "from": i.from, "positive": i.positive, "negative": i.negative}})
            }
            None => serde_json::json!({}),
        };
        let expires_at = now + i64::from(sms.validity_secs) * 1000;
        let lease = rand::random::<i64>().unsigned_abs() as i64 | 1;
        let new: Vec<NewMessage> = texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| NewMessage {
                direction: Direction::Outbound,
                kind: Kind::Sms,
                sms_config: sms.name.clone(),
                extension: extension.clone(),
                trunk: trunk.clone(),
                remote: to.to_string(),
                sender: sender.label().to_string(),
                segments: smsgw_rules::segments::count(&text).count as u32,
                body: text,
                media: if i == 0 { media_urls.clone() } else { vec![] },
                twilio_sid: None,
                status: MessageStatus::Stored,
                now,
                // Claimed by this task for its first attempt, which is about to happen.
                attempts: 1,
                lease,
                next_attempt_at: Some(now + LEASE_MS),
                expires_at: Some(expires_at),
                in_doubt: true,
                meta: meta.clone(),
            })
            .collect();
        let ids = self
            .store
            .insert_messages(new.clone())
            .await
            .map_err(|e| refused(500, format!("store: {e}")))?;
        self.count(Direction::Outbound, MessageStatus::Stored);
        Ok(ids
            .into_iter()
            .zip(new)
            .map(|(id, n)| Message::stored(id, n))
            .collect())
    }

    async fn check_policy(
        &self,
        source: &OwnedSource,
        sms_index: usize,
        to: &E164,
        sender: &Sender,
    ) -> Result<(), Refused> {
        let sms = &self.settings.sms[sms_index];
        let country = country::country_of(to);
        if !sms.allowed_countries.is_empty()
            && !country.is_some_and(|c| sms.allowed_countries.contains(&c))
        {
            let name = country.map_or("an unknown country".to_string(), |c| c.to_string());
            return Err(refused(
                403,
                format!(
                    "destination not permitted ({name} is not in allowed_countries of {:?})",
                    sms.name
                ),
            ));
        }
        if let Sender::Alpha(id) = sender {
            if country.is_some_and(|c| matches!(c.as_str(), "US" | "CA")) {
                return Err(refused(
                    403,
                    format!(
                        "Alphanumeric Sender ID {id} cannot send to the US or Canada; use a number"
                    ),
                ));
            }
        }
        if self.is_opted_out(to.as_str(), sender.label()) {
            return Err(refused(
                403,
                format!(
                    "{to} has opted out (STOP) of messages from {}",
                    sender.label()
                ),
            ));
        }
        if let OwnedSource::Extension(ext) = source {
            self.check_limits(ext).await?;
        }
        Ok(())
    }

    async fn check_limits(&self, ext: &str) -> Result<(), Refused> {
        let e = self
            .settings
            .extensions
            .iter()
            .find(|x| x.id.as_str() == ext);
        let per_minute = e
            .and_then(|x| x.rate_per_minute)
            .unwrap_or(self.settings.messaging.rate_per_minute);
        let per_day = e
            .and_then(|x| x.daily_quota)
            .unwrap_or(self.settings.messaging.daily_quota);
        let now = now_ms();
        let (minute, day) = (now / 60_000, now / 86_400_000);
        if per_day > 0 {
            let known = self
                .limits
                .day
                .lock()
                .expect("limits lock")
                .get(ext)
                .filter(|(d, _)| *d == day)
                .map(|(_, n)| *n);
            let sent = match known {
                Some(n) => n,
                // First message of the day since start: count what the store says was sent today.
                None => self
                    .store
                    .count_outbound_since(ext.to_string(), day * 86_400_000)
                    .await
                    .map_err(|e| refused(500, format!("store: {e}")))?,
            };
            if sent >= u64::from(per_day) {
                let mut r = refused(
                    403,
                    format!("daily quota of {per_day} messages reached for extension {ext}"),
                );
                r.retry_after = Some(((day + 1) * 86_400_000 - now).max(0) as u64 / 1000);
                return Err(r);
            }
            self.limits
                .day
                .lock()
                .expect("limits lock")
                .insert(ext.to_string(), (day, sent + 1));
        }
        if per_minute > 0 {
            let mut m = self.limits.minute.lock().expect("limits lock");
            let entry = m.entry(ext.to_string()).or_insert((minute, 0));
            if entry.0 != minute {
                *entry = (minute, 0);
            }
            if entry.1 >= per_minute {
                let mut r = refused(503, format!("rate limit of {per_minute} messages per minute reached for extension {ext}"));
                r.retry_after = Some((((minute + 1) * 60_000 - now).max(1000) / 1000) as u64);
                return Err(r);
            }
            entry.1 += 1;
        }
        Ok(())
    }

    /// One attempt at handing `m` (claimed: leased and marked in doubt) to Twilio.
    pub async fn attempt(&self, m: Message) -> Outcome {
        let (outcome, taken) = self.send_to_twilio(m).await;
        if let Some(taken) = taken {
            self.record_taken(taken).await;
        }
        outcome
    }

    /// Hands `m` to Twilio and returns the outcome. When Twilio took it, what is left to record
    /// comes back too, so that a waiting phone hears the outcome one commit sooner: until it is
    /// recorded, the row stays in doubt, and a restart finds it at Twilio instead of resending.
    async fn send_to_twilio(&self, m: Message) -> (Outcome, Option<Taken>) {
        let now = now_ms();
        let Some(sms_index) = self.sms_index(&m.sms_config) else {
            tracing::error!(id = m.id, sms = %m.sms_config, "message for an SMS configuration that no longer exists");
            return (Outcome::Queued, None);
        };
        // An earlier attempt may have reached Twilio: find out before expiring or resending.
        if m.reconcile {
            match self.reconcile(&m, sms_index).await {
                Ok(true) => return (Outcome::Accepted, None),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(id = m.id, error = %e, "cannot check Twilio for an earlier attempt; will retry");
                    return (self.retry(&m, None, true).await, None);
                }
            }
        }
        if m.expires_at.is_some_and(|t| now >= t) {
            return (
                self.finish(&m, MessageStatus::Expired, None, None).await,
                None,
            );
        }
        let sms = &self.settings.sms[sms_index];
        let wait = self.pacer.reserve(
            &m.sender,
            sms.messages_per_second,
            m.segments,
            tokio::time::Instant::now(),
        );
        if wait > MAX_INLINE_WAIT {
            self.pacer.cancel(&m.sender, m.segments);
            let update = Update {
                next_attempt_at: Some(Some(now + wait.as_millis() as i64)),
                in_doubt: Some(m.reconcile),
                ..Update::default()
            };
            self.save(m.id, update).await;
            return (Outcome::Queued, None);
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            self.pacer.done_waiting(&m.sender);
        }
        // Fencing: send only while this attempt still holds the message. A slow attempt whose
        // lease ran out (and was claimed again by the outbox) stops here instead of sending twice.
        // While the lease surely outlasts the request (the usual case: just claimed or just
        // stored), it holds without asking the store.
        let lease_ends = m.next_attempt_at.unwrap_or(0);
        let renewed = if now_ms() + REQUEST_BUDGET_MS < lease_ends {
            Ok(true)
        } else {
            self.store
                .renew_lease(m.id, m.lease, now_ms() + LEASE_MS)
                .await
        };
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    id = m.id,
                    "lost the lease on a message; another attempt has it"
                );
                return (Outcome::Queued, None);
            }
            Err(e) => {
                tracing::error!(id = m.id, error = %e, "cannot renew a lease; not sending now");
                return (Outcome::Queued, None);
            }
        }
        let is_service = m.sender.starts_with("MG") && m.sender.len() == 34;
        let request = SendRequest {
            to: m.remote.clone(),
            from: (!is_service).then(|| m.sender.clone()),
            messaging_service_sid: is_service.then(|| m.sender.clone()),
            body: m.body.clone(),
            media_urls: m.media.clone(),
            status_callback: Some(format!(
                "{}?{MESSAGE_ID_PARAM}={}",
                self.status_callback_url(sms_index),
                m.id
            )),
            extra: sms.send_params.clone(),
        };
        let started = std::time::Instant::now();
        let outcome = self.twilio.send(&self.accounts[sms_index], &request).await;
        self.metrics
            .twilio_latency
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            SendOutcome::Created(res) => {
                let taken = Taken {
                    id: m.id,
                    status: accepted_status(res.status.as_deref()),
                    sid: res.sid,
                };
                (Outcome::Accepted, Some(taken))
            }
            SendOutcome::Rejected(err) => {
                self.metrics
                    .twilio_errors
                    .get_or_create(&CodeLabel { code: err.code })
                    .inc();
                if err.code == 21610 {
                    // Twilio knows the recipient said STOP: remember it for this sender.
                    if let Err(e) = self.set_opt_out(&m.remote, &m.sender, true, now).await {
                        tracing::error!(error = %e, "cannot record an opt-out");
                    }
                }
                let outcome = self
                    .finish(&m, MessageStatus::Failed, Some(err.code), Some(err.message))
                    .await;
                (outcome, None)
            }
            SendOutcome::Retry {
                after,
                reason,
                in_doubt,
            } => {
                tracing::info!(id = m.id, %reason, "Twilio send will be retried");
                if let Some(code) = reason.contains("20429").then_some(20429) {
                    self.metrics
                        .twilio_errors
                        .get_or_create(&CodeLabel { code })
                        .inc();
                }
                (self.retry(&m, after, in_doubt).await, None)
            }
        }
    }

    /// Records that Twilio took a message, then applies callbacks that came before its SID.
    async fn record_taken(&self, taken: Taken) {
        let update = Update {
            status: Some(taken.status),
            twilio_sid: taken.sid.clone(),
            next_attempt_at: Some(None),
            in_doubt: Some(false),
            ..Update::default()
        };
        self.save(taken.id, update).await;
        self.count(Direction::Outbound, taken.status);
        if let Some(sid) = taken.sid {
            self.apply_early_status(&sid).await;
        }
    }

    /// Puts the message back in the outbox with exponential backoff and jitter (at least
    /// `after`, Twilio's Retry-After), or expires it when its validity runs out first.
    async fn retry(&self, m: &Message, after: Option<Duration>, in_doubt: bool) -> Outcome {
        self.metrics.twilio_retries.inc();
        let exp = 1000i64.saturating_mul(1 << m.attempts.min(16));
        let cap = self.settings.messaging.retry_max_secs as i64 * 1000;
        let jitter = rand::random::<f64>() * 0.4 + 0.8;
        let mut delay = ((exp.min(cap)) as f64 * jitter) as i64;
        if let Some(a) = after {
            delay = delay.max(a.as_millis() as i64);
        }
        let mut next = now_ms() + delay;
        if let Some(t) = m.expires_at.filter(|t| next >= *t) {
            if !in_doubt {
                return self.finish(m, MessageStatus::Expired, None, None).await;
            }
            // It may have reached Twilio: one more attempt at the deadline reconciles first.
            next = t.max(now_ms() + 1000);
        }
        let update = Update {
            next_attempt_at: Some(Some(next)),
            in_doubt: Some(in_doubt),
            ..Update::default()
        };
        self.save(m.id, update).await;
        self.outbox_kick.notify_one();
        Outcome::Queued
    }

    /// A final status decided here (not by a callback): store it and tell the phone when asked.
    async fn finish(
        &self,
        m: &Message,
        status: MessageStatus,
        code: Option<i64>,
        message: Option<String>,
    ) -> Outcome {
        let update = Update {
            status: Some(status),
            error: Some((code, message.clone())),
            next_attempt_at: Some(None),
            in_doubt: Some(false),
            ..Update::default()
        };
        self.save(m.id, update).await;
        self.count(Direction::Outbound, status);
        match status {
            MessageStatus::Failed => Outcome::Rejected {
                code: code.unwrap_or(0),
                message: message.unwrap_or_default(),
            },
            _ => {
                self.notify_outcome(&m.id, false).await;
                Outcome::Expired
            }
        }
    }

    async fn save(&self, id: i64, update: Update) {
        if let Err(e) = self.store.update_message(id, update, now_ms()).await {
            self.metrics.store_errors.inc();
            tracing::error!(id, error = %e, "cannot save a message's state");
        }
    }

    /// Looks for an earlier attempt of `m` at Twilio (same To, From and body, created since our
    /// row, not already known to us). Adopts it when found; `Ok(false)` means send again.
    async fn reconcile(
        &self,
        m: &Message,
        sms_index: usize,
    ) -> Result<bool, crate::twilio::client::ClientError> {
        let is_service = m.sender.starts_with("MG");
        // Newest first, no DateSent filter: a queued or accepted message has no date_sent yet.
        // Pages stop once they reach messages created well before ours.
        let since = m.created_at / 1000 - 60;
        let found = self
            .twilio
            .list_messages(
                &self.accounts[sms_index],
                &m.remote,
                (!is_service).then_some(m.sender.as_str()),
                since,
                5,
            )
            .await?;
        for res in found {
            let same = res.body.as_deref() == Some(m.body.as_str())
                && (res.from.as_deref() == Some(m.sender.as_str())
                    || res.messaging_service_sid.as_deref() == Some(m.sender.as_str()));
            let Some(sid) = res.sid.clone().filter(|_| same) else {
                continue;
            };
            let status = accepted_status(res.status.as_deref());
            // Atomic: two in-doubt copies of the same text cannot both claim one SID.
            match self
                .store
                .adopt_sid(m.id, sid.clone(), status, now_ms())
                .await
            {
                Ok(true) => {
                    tracing::info!(id = m.id, %sid, "an earlier attempt reached Twilio; not sending again");
                    self.apply_early_status(&sid).await;
                    return Ok(true);
                }
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(id = m.id, error = %e, "cannot record a reconciled SID");
                    continue;
                }
            }
        }
        Ok(false)
    }

    /// Sends whatever the outbox holds that is due, until cancelled.
    pub async fn outbox_loop(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            let claimed = match self.store.claim_outbound(now_ms(), LEASE_MS, 256).await {
                Ok(c) => c,
                Err(e) => {
                    self.metrics.store_errors.inc();
                    tracing::error!(error = %e, "cannot read the outbox");
                    vec![]
                }
            };
            let full = claimed.len() == 256;
            for m in claimed {
                let permit = tokio::select! {
                    p = self.in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    _ = cancel.cancelled() => return,
                };
                let this = self.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let id = m.id;
                    if let Outcome::Rejected { .. } = this.attempt(m).await {
                        this.notify_outcome(&id, false).await;
                    }
                });
            }
            if full {
                continue;
            }
            tokio::select! {
                _ = self.outbox_kick.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// A status callback from Twilio (already matched to a configuration and signature-checked);
    /// `id` is our message id from the callback URL (absent on hand-made URLs and on messages
    /// sent before ids were carried).
    pub async fn on_status(&self, params: &[(String, String)], id: Option<i64>) {
        self.apply_status(params, id, true).await;
    }

    /// `recheck`: if the SID is not saved yet, look once more after keeping the callback.
    async fn apply_status(&self, params: &[(String, String)], id: Option<i64>, recheck: bool) {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let (Some(sid), Some(status)) = (
            get("MessageSid"),
            get("MessageStatus").or_else(|| get("SmsStatus")),
        ) else {
            return;
        };
        let Some(status) = MessageStatus::from_twilio(status) else {
            return;
        };
        let code = get("ErrorCode").and_then(|c| c.parse().ok());
        let message = get("ErrorMessage").map(str::to_string);
        let callback = StatusCallback {
            sid: sid.to_string(),
            id,
            to: get("To").map(str::to_string),
        };
        let advanced = self
            .store
            .advance_status(callback, status, (code, message), now_ms())
            .await;
        match advanced {
            Ok(Advance::Moved(m)) => {
                self.count(Direction::Outbound, status);
                if let Some(c) = code {
                    self.metrics
                        .twilio_errors
                        .get_or_create(&CodeLabel { code: c })
                        .inc();
                }
                match status {
                    MessageStatus::Failed | MessageStatus::Undelivered => {
                        self.notify_outcome(&m.id, false).await
                    }
                    MessageStatus::Delivered => self.notify_outcome(&m.id, true).await,
                    _ => {}
                }
            }
            // Twilio can call back before our save of its answer has committed: keep the
            // callback for a while and apply it once the SID is ours.
            Ok(Advance::NotSaved) => {
                self.stash_early_status(sid, params, id);
                // The save may have committed, and looked for kept callbacks, between our
                // check and keeping this one: look once more, or it would wait for nobody.
                if recheck {
                    Box::pin(self.apply_early_status(sid)).await;
                }
            }
            Ok(Advance::Refused) => {
                tracing::debug!(%sid, %status, "status callback for an unknown message or one that would move it back; ignored");
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(error = %e, "cannot save a status callback");
            }
        }
    }

    /// Keeps a callback for a SID not saved yet; bounded, and old ones are dropped.
    fn stash_early_status(&self, sid: &str, params: &[(String, String)], id: Option<i64>) {
        let mut early = self.early_status.lock().expect("early lock");
        let now = now_ms();
        early.retain(|_, (_, at)| now - *at < 600_000);
        if early.len() < 10_000 {
            early
                .entry(sid.to_string())
                .or_insert_with(|| (Vec::new(), now))
                .0
                .push((params.to_vec(), id));
        }
    }

    /// Applies callbacks that arrived before `sid` was saved; one that still finds it unsaved
    /// is kept again.
    async fn apply_early_status(&self, sid: &str) {
        let stashed = self.early_status.lock().expect("early lock").remove(sid);
        for (params, id) in stashed.map(|(p, _)| p).unwrap_or_default() {
            Box::pin(self.apply_status(&params, id, false)).await;
        }
    }

    /// Tells the sender of outbound message `id` how it ended: an IMDN if the phone asked for
    /// one, otherwise (failures only) a text from the system sender.
    async fn notify_outcome(&self, id: &i64, delivered: bool) {
        let Ok(Some(m)) = self.store.message(*id).await else {
            return;
        };
        if m.kind != Kind::Sms {
            return;
        }
        let owner = match (&m.extension, &m.trunk) {
            (Some(e), _) => Owner::Extension(e.clone()),
            (None, Some(t)) => Owner::Trunk(t.clone()),
            _ => return,
        };
        let imdn = m.meta.get("imdn").cloned();
        let wants = |k: &str| {
            imdn.as_ref()
                .and_then(|i| i.get(k))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
        };
        if let Some(i) = imdn
            .as_ref()
            .filter(|_| wants(if delivered { "positive" } else { "negative" }))
        {
            let request = crate::content::ImdnRequest {
                message_id: i["message_id"].as_str().unwrap_or_default().to_string(),
                from: i["from"].as_str().unwrap_or_default().to_string(),
                positive: true,
                negative: true,
            };
            let now = httpdate::fmt_http_date(std::time::SystemTime::now());
            let gateway = format!("sip:{}@{}", m.remote, self.settings.gateway.domain);
            let body = crate::content::imdn_body(
                &request,
                &gateway,
                delivered,
                &now,
                &crate::store::sqlite::new_token(),
            );
            let meta = serde_json::json!({"content_type": "message/cpim", "from_user": m.remote, "about": m.id});
            self.queue_notice(owner.clone(), &m.sms_config, body, meta)
                .await;
        } else if !delivered {
            let meta = serde_json::json!({"about": m.id});
            self.queue_notice(owner.clone(), &m.sms_config, super::failure_text(&m), meta)
                .await;
        } else {
            return;
        }
        self.kick_delivery(owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twilio_codes_map_to_sip() {
        for (code, sip) in [
            (21211, 484),
            (21610, 403),
            (21408, 403),
            (21614, 488),
            (21612, 404),
            (29999, 400),
        ] {
            assert_eq!(sip_status_for(code), sip, "{code}");
        }
    }
}
