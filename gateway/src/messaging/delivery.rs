//! Delivery over SIP with store-and-forward: a MESSAGE to every registered contact of an
//! extension (or to a trunk), over the flow each contact registered on; in order, one message at a
//! time per extension; kept until a contact takes it, it fails for good, or it expires.

use super::{now_ms, Messaging, Owner};
use crate::metrics::CodeLabel;
use crate::store::{Kind, Message, Store, Update};
use dashmap::DashMap;
use smsgw_rules::MessageStatus;
use smsgw_sip::uri::SipUri;
use smsgw_sip::{Flow, Headers, Method, Request, Transport};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// RFC 3428 §8: larger MESSAGEs must not go over UDP.
const MAX_UDP_MESSAGE: usize = 1300;
/// Messages read from the store at a time.
const STORE_BATCH: u32 = 50;
/// Messages handed over in memory per owner before falling back to the store.
const INBOX_MEMORY: usize = 256;

/// An owner's messages handed over in memory as they commit. `complete` means every pending
/// row with an id above `upto` is in `queue` (ascending); otherwise the store is the only truth.
/// `generation` changes whenever memory is dropped, so a store read that raced with that does
/// not declare memory complete.
#[derive(Default)]
struct Inbox {
    queue: std::collections::VecDeque<Message>,
    complete: bool,
    /// A deliverer runs for this owner. Memory holds messages only then or while complete, so an
    /// offline phone's texts wait in the store, not here.
    active: bool,
    generation: u64,
    /// The last id delivered (or given up) in order; anything at or below it is done.
    upto: i64,
}

/// Every owner's messages handed over in memory, so a phone that keeps up never waits for a
/// store read.
#[derive(Default)]
pub struct Inboxes(DashMap<Owner, Inbox>);

impl Inboxes {
    /// A message that has just committed (called in commit order, on the database thread).
    pub fn hand_over(&self, owner: Owner, m: Message) {
        let mut inbox = self.0.entry(owner).or_default();
        if m.id <= inbox.upto || !(inbox.complete || inbox.active) {
            return;
        }
        if inbox.queue.len() >= INBOX_MEMORY {
            // A backlog: the store has it all; memory holds nothing rather than a part.
            inbox.queue.clear();
            inbox.complete = false;
            inbox.generation += 1;
        } else {
            inbox.queue.push_back(m);
        }
    }

    /// Marks a deliverer running for `owner` until the guard is dropped; then, unless memory
    /// holds everything, it is let go.
    fn activate<'a>(&'a self, owner: &Owner) -> impl Drop + 'a {
        struct Active<'a>(&'a Inboxes, Owner);
        impl Drop for Active<'_> {
            fn drop(&mut self) {
                let mut inbox = self.0 .0.entry(self.1.clone()).or_default();
                inbox.active = false;
                if !inbox.complete {
                    inbox.queue.clear();
                }
            }
        }
        self.0.entry(owner.clone()).or_default().active = true;
        Active(self, owner.clone())
    }

    /// Something reached `owner`'s inbox without a hand-over (a notice) or delivery stopped
    /// part-way: the next run reads the store.
    pub fn fall_back_to_store(&self, owner: &Owner) {
        let mut inbox = self.0.entry(owner.clone()).or_default();
        inbox.queue.clear();
        inbox.complete = false;
        inbox.generation += 1;
    }

    /// Everything handed over, once memory is known to hold all that waits (`None`: read the
    /// store instead).
    fn take(&self, owner: &Owner) -> Option<Vec<Message>> {
        let mut inbox = self.0.entry(owner.clone()).or_default();
        if !inbox.complete {
            return None;
        }
        let batch: Vec<Message> = inbox.queue.drain(..).collect();
        if let Some(last) = batch.last() {
            inbox.upto = last.id;
        }
        Some(batch)
    }

    /// Whether `owner`'s mailbox surely holds fewer than `cap` texts, without asking the store:
    /// while memory is complete, what waits is what memory holds plus at most one batch being
    /// delivered (each at most `INBOX_MEMORY`).
    pub fn surely_below(&self, owner: &Owner, cap: u64) -> bool {
        self.0.get(owner).is_some_and(|i| i.complete) && 2 * INBOX_MEMORY as u64 + 1 < cap
    }

    fn generation(&self, owner: &Owner) -> u64 {
        self.0.get(owner).map_or(0, |i| i.generation)
    }

    /// A store read that started at `generation` found nothing pending beyond `last`: whatever
    /// commits later is handed over, so memory now holds all that waits — unless memory was
    /// dropped since the read began.
    fn caught_up(&self, owner: &Owner, generation: u64, last: i64) {
        let mut inbox = self.0.entry(owner.clone()).or_default();
        inbox.upto = inbox.upto.max(last);
        if inbox.generation == generation {
            let upto = inbox.upto;
            inbox.queue.retain(|m| m.id > upto);
            inbox.complete = true;
        }
    }
}

#[derive(Debug)]
enum Delivery {
    Delivered(Vec<u16>),
    /// A permanent refusal from every contact (403, 404, 415, 488, …).
    Failed(Vec<u16>),
    /// Nobody to deliver to, or only temporary failures (408, 480, 503, no answer).
    Later(Vec<u16>),
}

fn permanent(code: u16) -> bool {
    (400..500).contains(&code) && !matches!(code, 401 | 407 | 408 | 423 | 480 | 486 | 491)
}

/// Splits `text` into chunks of at most `max` bytes on character boundaries.
fn chunks(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if current.len() + c.len_utf8() > max && !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() || out.is_empty() {
        out.push(current);
    }
    out
}

impl Messaging {
    /// Starts delivering `owner`'s inbox unless a run is already under way (it is then told to
    /// look again before it stops).
    pub fn kick_delivery(&self, owner: Owner) {
        self.waiting.insert(owner.clone());
        if !self.delivering.insert(owner.clone()) {
            self.redeliver.insert(owner);
            return;
        }
        let Some(this) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            self.delivering.remove(&owner);
            return;
        };
        tokio::spawn(async move {
            loop {
                this.deliver_owner(&owner).await;
                if this.redeliver.remove(&owner).is_none() {
                    this.delivering.remove(&owner);
                    // A kick between the check and the removal set `redeliver` again.
                    if this.redeliver.remove(&owner).is_none()
                        || !this.delivering.insert(owner.clone())
                    {
                        break;
                    }
                }
            }
        });
    }

    /// Delivers `owner`'s inbox in order: from the store until it has caught up, then from the
    /// messages handed over in memory as they commit (no store read per text). Results are saved
    /// without waiting for each commit (at most one batch outstanding), so one fsync does not gate
    /// the next MESSAGE; a crash before the save means a phone may see a text twice, never zero
    /// times.
    async fn deliver_owner(&self, owner: &Owner) {
        let Some(this) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let (extension, trunk) = owner.columns();
        let _active = self.inboxes.activate(owner);
        let mut after_id = 0;
        loop {
            let batch = match self.inboxes.take(owner) {
                Some(batch) if batch.is_empty() => {
                    self.waiting.remove(owner);
                    return;
                }
                Some(batch) => batch,
                None => {
                    let generation = self.inboxes.generation(owner);
                    let batch = match self
                        .store
                        .pending_inbound(extension.clone(), trunk.clone(), after_id, STORE_BATCH)
                        .await
                    {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read an inbox");
                            return;
                        }
                    };
                    if batch.len() < STORE_BATCH as usize {
                        let last = batch.last().map_or(after_id, |m| m.id);
                        self.inboxes.caught_up(owner, generation, last);
                    }
                    batch
                }
            };
            let mut saving = tokio::task::JoinSet::new();
            for m in batch {
                after_id = m.id;
                let now = now_ms();
                let (status, detail, links) = if m.expires_at.is_some_and(|t| now >= t) {
                    (
                        MessageStatus::Expired,
                        serde_json::json!({"error": "expired before delivery"}),
                        None,
                    )
                } else {
                    let (result, links) = self.deliver_one(&m, owner).await;
                    match result {
                        Delivery::Delivered(codes) => (
                            MessageStatus::Delivered,
                            serde_json::json!({"sip": codes}),
                            links,
                        ),
                        Delivery::Failed(codes) => (
                            MessageStatus::Failed,
                            serde_json::json!({"sip": codes}),
                            links,
                        ),
                        Delivery::Later(codes) => {
                            // Order per extension: nothing behind this message goes first. What
                            // waits is in the store; the next run reads it from there.
                            self.inboxes.fall_back_to_store(owner);
                            let retry = self.settings.messaging.inbox_retry_secs as i64 * 1000;
                            let mut meta = m.meta.clone();
                            meta["sip"] = serde_json::json!(codes);
                            let update = Update {
                                next_attempt_at: Some(Some(now_ms() + retry)),
                                meta: Some(meta),
                                ..Update::default()
                            };
                            let _ = self.store.update_message(m.id, update, now_ms()).await;
                            while saving.join_next().await.is_some() {}
                            return;
                        }
                    }
                };
                let this = this.clone();
                saving.spawn(async move { this.close(&m, status, detail, links).await });
            }
            while saving.join_next().await.is_some() {}
        }
    }

    /// A phone (re)registered: deliver what waits for it, if anything does.
    pub fn on_registered(&self, extension: &str) {
        let owner = Owner::Extension(extension.to_string());
        if self.waiting.contains(&owner) {
            self.kick_delivery(owner);
        }
    }

    async fn close(
        &self,
        m: &Message,
        status: MessageStatus,
        mut detail: serde_json::Value,
        links: Option<Vec<String>>,
    ) {
        let links = links
            .map(serde_json::Value::from)
            .or_else(|| m.meta.get("links").cloned());
        if let (Some(links), Some(obj)) = (links, detail.as_object_mut()) {
            obj.insert("links".into(), links);
        }
        let update = Update {
            status: Some(status),
            next_attempt_at: Some(None),
            meta: Some(detail),
            ..Update::default()
        };
        if let Err(e) = self.store.update_message(m.id, update, now_ms()).await {
            tracing::error!(id = m.id, error = %e, "cannot save a delivery result");
        }
        self.count(crate::store::Direction::Inbound, status);
    }

    /// The flows to try: every live binding of the extension, or the trunk's address.
    async fn targets(&self, owner: &Owner, did: &str) -> Vec<(String, Flow)> {
        match owner {
            Owner::Extension(ext) => self
                .registrar
                .lookup(ext, tokio::time::Instant::now())
                .into_iter()
                .map(|b| (b.contact.to_string(), b.flow))
                .collect(),
            Owner::Trunk(name) => {
                let Some(trunk) = self.settings.trunks.iter().find(|t| &t.name == name) else {
                    return vec![];
                };
                let Some(uri) = SipUri::parse(&trunk.uri) else {
                    return vec![];
                };
                let transport = if uri.transport().as_deref() == Some("tcp") {
                    Transport::Tcp
                } else {
                    Transport::Udp
                };
                let host = uri.host.trim_start_matches('[').trim_end_matches(']');
                let addr = tokio::net::lookup_host((host, uri.port.unwrap_or(5060)))
                    .await
                    .ok()
                    .and_then(|mut a| a.next());
                let Some(flow) = addr.and_then(|a| self.endpoint.flow_to(transport, a).ok()) else {
                    return vec![];
                };
                let target = format!("sip:{did}@{}:{}", uri.host, uri.port.unwrap_or(5060));
                vec![(target, flow)]
            }
        }
    }

    /// Fetches an inbound MMS's media from Twilio once, serves it under `public_url`, and
    /// returns the links (kept in the row's meta for later attempts).
    async fn media_links(&self, m: &Message) -> Result<Vec<String>, String> {
        if let Some(links) = m
            .meta
            .get("links")
            .and_then(|l| serde_json::from_value::<Vec<String>>(l.clone()).ok())
        {
            return Ok(links);
        }
        let index = self
            .sms_index(&m.sms_config)
            .ok_or("unknown SMS configuration")?;
        let mut links = Vec::new();
        for url in &m.media {
            let fetched = self
                .twilio
                .fetch_media(
                    &self.accounts[index],
                    url,
                    self.settings.messaging.max_media_bytes,
                )
                .await;
            let (content_type, data) = match fetched {
                Ok(f) => f,
                // Gone, refused or too large will not get better: say so in the text rather than
                // hold this extension's inbox until the message expires.
                Err(crate::twilio::client::ClientError::Api { error, .. })
                    if (400..500).contains(&error.http_status) =>
                {
                    tracing::warn!(id = m.id, %url, code = error.http_status, "MMS media cannot be fetched; delivering the text without it");
                    links.push(format!(
                        "[a picture could not be fetched: {}]",
                        error.message
                    ));
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let token = crate::store::sqlite::new_token();
            let expires = now_ms() + self.settings.messaging.media_ttl_secs as i64 * 1000;
            self.store
                .put_media(token.clone(), content_type, data, expires)
                .await
                .map_err(|e| e.to_string())?;
            links.push(format!(
                "{}/media/{token}",
                self.settings.gateway.public_url
            ));
        }
        let mut meta = m.meta.clone();
        meta["links"] = serde_json::json!(links);
        let update = Update {
            meta: Some(meta),
            ..Update::default()
        };
        let _ = self.store.update_message(m.id, update, now_ms()).await;
        Ok(links)
    }

    fn build(
        &self,
        m: &Message,
        target: &str,
        to_user: &str,
        content_type: &str,
        body: String,
    ) -> Request {
        let domain = &self.settings.gateway.domain;
        let from = match m.kind {
            Kind::Notice => {
                let user = m
                    .meta
                    .get("from_user")
                    .and_then(|v| v.as_str())
                    .unwrap_or(&self.settings.gateway.system_sender);
                format!("<sip:{user}@{domain}>;tag={}", smsgw_sip::random_token(10))
            }
            _ => format!(
                "\"{0}\" <sip:{0}@{domain}>;tag={1}",
                m.remote,
                smsgw_sip::random_token(10)
            ),
        };
        let mut headers = Headers::new();
        headers.push("Max-Forwards", "70");
        headers.push("From", from);
        headers.push("To", format!("<sip:{to_user}@{domain}>"));
        headers.push(
            "Call-ID",
            format!("{}@{domain}", smsgw_sip::random_token(20)),
        );
        headers.push("CSeq", "1 MESSAGE");
        headers.push("Content-Type", content_type.to_string());
        if m.kind == Kind::Notice {
            // Marks gateway-made messages so nothing ever answers them with another notice.
            headers.push("X-Smsgw-Notice", "1");
        }
        Request {
            method: Method::Message,
            uri: target.to_string(),
            headers,
            body: body.into_bytes().into(),
        }
    }

    /// Delivers one message; also returns the media links it made, if any.
    async fn deliver_one(&self, m: &Message, owner: &Owner) -> (Delivery, Option<Vec<String>>) {
        let targets = self.targets(owner, &m.sender).await;
        if targets.is_empty() {
            return (Delivery::Later(vec![]), None);
        }
        let mut text = m.body.clone();
        let mut made_links = None;
        if !m.media.is_empty() {
            match self.media_links(m).await {
                Ok(links) => {
                    for l in &links {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(l);
                    }
                    made_links = Some(links);
                }
                Err(e) => {
                    tracing::warn!(id = m.id, error = %e, "cannot fetch MMS media from Twilio; will retry");
                    return (Delivery::Later(vec![]), None);
                }
            }
        }
        match m.kind {
            Kind::OptOut => text.push_str(&format!(
                "\n[{} opted out of texts from {}]",
                m.remote, m.sender
            )),
            Kind::OptIn => text.push_str(&format!(
                "\n[{} opted back in to texts from {}]",
                m.remote, m.sender
            )),
            _ => {}
        }
        let content_type = m
            .meta
            .get("content_type")
            .and_then(|v| v.as_str())
            .unwrap_or("text/plain;charset=UTF-8")
            .to_string();
        let to_user = match owner {
            Owner::Extension(e) => e.clone(),
            Owner::Trunk(_) => m.sender.clone(),
        };
        let mut tasks = tokio::task::JoinSet::new();
        for (target, flow) in targets {
            let whole = self.build(m, &target, &to_user, &content_type, text.clone());
            let size = whole.to_bytes().len() + 120; // room for the Via the endpoint adds
            let requests = if flow.transport == Transport::Udp
                && size > MAX_UDP_MESSAGE
                && content_type.starts_with("text/plain")
            {
                let overhead = size - text.len();
                chunks(&text, MAX_UDP_MESSAGE.saturating_sub(overhead).max(200))
                    .into_iter()
                    .map(|p| self.build(m, &target, &to_user, &content_type, p))
                    .collect()
            } else {
                vec![whole]
            };
            let endpoint = self.endpoint.clone();
            tasks.spawn(async move {
                let mut code = 0;
                for req in requests {
                    code = match endpoint.send_request(req, flow).await {
                        Ok(resp) => resp.code,
                        Err(_) => 0,
                    };
                    if !(200..300).contains(&code) {
                        break;
                    }
                }
                code
            });
        }
        let mut codes = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let code = r.unwrap_or(0);
            self.metrics
                .deliveries
                .get_or_create(&CodeLabel {
                    code: i64::from(code),
                })
                .inc();
            codes.push(code);
        }
        let result = if codes.iter().any(|c| (200..300).contains(c)) {
            Delivery::Delivered(codes)
        } else if codes.iter().all(|c| permanent(*c)) {
            Delivery::Failed(codes)
        } else {
            Delivery::Later(codes)
        };
        (result, made_links)
    }

    /// Retries inboxes whose next attempt is due, until cancelled.
    pub async fn inbox_loop(self: Arc<Self>, cancel: CancellationToken) {
        let period =
            Duration::from_secs((self.settings.messaging.inbox_retry_secs / 4).clamp(1, 15));
        loop {
            match self.store.due_inbound_owners(now_ms()).await {
                Ok(owners) => {
                    for (e, t) in owners {
                        if let Some(owner) = Owner::from_columns(e, t) {
                            self.kick_delivery(owner);
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read the inboxes"),
            }
            self.refresh_gauges().await;
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> Message {
        let mut new = crate::store::NewMessage::sample(crate::store::Direction::Inbound, 0);
        new.body = format!("text {id}");
        Message::stored(id, new)
    }

    fn ids(batch: Option<Vec<Message>>) -> Option<Vec<i64>> {
        batch.map(|b| b.iter().map(|m| m.id).collect())
    }

    #[test]
    fn handed_over_messages_are_used_only_once_memory_holds_everything() {
        let owner = Owner::Extension("101".into());
        let inboxes = Inboxes::default();
        // No deliverer and nothing known (a fresh start, or an offline phone): the store keeps it.
        inboxes.hand_over(owner.clone(), row(2));
        let active = inboxes.activate(&owner);
        assert_eq!(ids(inboxes.take(&owner)), None);
        inboxes.hand_over(owner.clone(), row(4));
        // A store read saw 3 and 4 pending; 5 committed after it and was handed over; 4's
        // hand-over was late (it came after the read that found it).
        let generation = inboxes.generation(&owner);
        inboxes.hand_over(owner.clone(), row(5));
        inboxes.caught_up(&owner, generation, 4);
        assert_eq!(ids(inboxes.take(&owner)), Some(vec![5]));
        inboxes.hand_over(owner.clone(), row(3));
        inboxes.hand_over(owner.clone(), row(6));
        inboxes.hand_over(owner.clone(), row(7));
        assert_eq!(ids(inboxes.take(&owner)), Some(vec![6, 7]));
        assert_eq!(ids(inboxes.take(&owner)), Some(vec![]));
        assert!(inboxes.surely_below(&owner, 1000));
        assert!(!inboxes.surely_below(&owner, 2 * INBOX_MEMORY as u64));
        // Caught up, the deliverer stops; what commits next waits in memory for the next run.
        drop(active);
        inboxes.hand_over(owner.clone(), row(8));
        assert_eq!(ids(inboxes.take(&owner)), Some(vec![8]));
    }

    #[test]
    fn memory_dropped_during_a_store_read_keeps_the_store_in_charge() {
        let owner = Owner::Trunk("pbx".into());
        let inboxes = Inboxes::default();
        let active = inboxes.activate(&owner);
        let generation = inboxes.generation(&owner);
        // A notice was queued (no hand-over) while the read was under way.
        inboxes.fall_back_to_store(&owner);
        inboxes.caught_up(&owner, generation, 10);
        assert_eq!(ids(inboxes.take(&owner)), None);
        assert!(
            !inboxes.surely_below(&owner, 1000),
            "not complete: ask the store"
        );
        // The next read is clean.
        let generation = inboxes.generation(&owner);
        inboxes.caught_up(&owner, generation, 11);
        assert_eq!(ids(inboxes.take(&owner)), Some(vec![]));
        // A backlog larger than memory: back to the store, nothing half-held.
        for id in 12..12 + INBOX_MEMORY as i64 + 1 {
            inboxes.hand_over(owner.clone(), row(id));
        }
        assert_eq!(ids(inboxes.take(&owner)), None);
        // A phone that stopped answering: the deliverer falls back and ends; later texts are not
        // held in memory while nobody delivers.
        inboxes.fall_back_to_store(&owner);
        drop(active);
        inboxes.hand_over(owner.clone(), row(500));
        assert!(inboxes.0.get(&owner).unwrap().queue.is_empty());
    }

    #[test]
    fn chunking_keeps_characters_whole() {
        assert_eq!(chunks("abcdef", 4), vec!["abcd", "ef"]);
        assert_eq!(chunks("ééé", 4), vec!["éé", "é"]);
        assert_eq!(chunks("", 4), vec![""]);
        assert!(
            permanent(404)
                && permanent(415)
                && !permanent(480)
                && !permanent(408)
                && !permanent(503)
        );
    }
}
