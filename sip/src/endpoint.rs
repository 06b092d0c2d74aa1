//! The SIP endpoint: UDP and TCP listeners, the connection table, and the RFC 3261 non-INVITE
//! transaction layer for both roles.
//!
//! Server side: every request gets a transaction keyed by (branch, sent-by, method). The handler
//! sees a request once; a retransmission while it is being handled is absorbed, and one after the
//! final response is answered with the same bytes for Timer J (64·T1) on UDP.
//! Client side: [`Endpoint::send_request`] retransmits on Timer E over UDP and gives up on
//! Timer F, returning the final response.

use crate::message::{Head, Message, Method, ParseError, Request, Response};
use crate::transport::{ConnId, Flow, Frame, StreamDecoder, Transport};
use crate::uri::Via;
use bytes::Bytes;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// RFC 3261 §17 timer base values.
pub const T1: Duration = Duration::from_millis(500);
pub const T2: Duration = Duration::from_secs(4);
/// Timer F and Timer J: 64·T1.
pub const TIMER_F: Duration = Duration::from_secs(32);

#[derive(Debug, thiserror::Error)]
pub enum SipError {
    #[error("cannot listen on {transport}:{addr}: {source}")]
    Bind {
        transport: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no {0} listener to send from")]
    NoListener(&'static str),
    #[error("sending to {addr} failed: {source}")]
    Send {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no final response from {0} within 32 s (Timer F)")]
    Timeout(SocketAddr),
    #[error("the endpoint is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub listen: Vec<(Transport, SocketAddr)>,
    /// Tasks reading each UDP socket; more than one lets the handler run on several cores.
    pub udp_workers: usize,
    /// Largest body accepted on a stream (a datagram is bounded by its own size).
    pub max_body: usize,
    pub max_tcp_connections: usize,
    /// A stream connection with no traffic for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Hard bound on server transactions remembered at once; above it requests get 503.
    pub max_server_transactions: usize,
    /// Hard bound on the bytes those transactions hold (keys and cached responses).
    pub max_server_transaction_bytes: usize,
    /// Requested kernel receive and send buffer of each UDP socket; the kernel may cap it
    /// (net.core.rmem_max). A burst larger than the buffer is dropped before we see it.
    pub udp_buffer_bytes: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            udp_workers: 2,
            max_body: 1024 * 1024,
            max_tcp_connections: 10_000,
            tcp_idle_timeout: Duration::from_secs(3660),
            max_server_transactions: 1_000_000,
            max_server_transaction_bytes: 256 * 1024 * 1024,
            udp_buffer_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The application above the transaction layer.
pub trait Handler: Send + Sync + 'static {
    /// A new request; it must be answered through [`ServerTx::respond`] (a dropped transaction
    /// answers 500). Called on the receiving task: do quick work inline, spawn slow work.
    fn on_request(&self, tx: ServerTx);

    /// A message that could not be parsed, or a request refused before reaching `on_request`.
    fn on_refused(&self, _source: SocketAddr, _error: &ParseError) {}

    /// A stream connection closed; bindings on it can no longer be reached over it.
    fn on_connection_closed(&self, _conn: ConnId) {}
}

#[derive(Debug)]
enum TxState {
    Proceeding,
    Completed(Bytes),
}

struct Connection {
    tx: mpsc::Sender<Bytes>,
    closed: CancellationToken,
}

/// A stream message must arrive whole within this long once its first byte is in (slowloris).
const MESSAGE_DEADLINE: Duration = Duration::from_secs(30);
/// A peer that does not read its responses for this long is disconnected.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// Longest Via branch or Call-ID kept as a transaction key.
const MAX_KEY_FIELD: usize = 256;

struct Inner {
    config: EndpointConfig,
    /// With their bound addresses: asking the socket costs a system call per send.
    udp: Vec<(SocketAddr, Arc<UdpSocket>)>,
    tcp: Vec<(SocketAddr, Arc<TcpListener>)>,
    conns: DashMap<ConnId, Connection>,
    conn_by_remote: DashMap<SocketAddr, ConnId>,
    next_conn: AtomicU64,
    conn_slots: Arc<Semaphore>,
    server_txs: DashMap<Box<str>, TxState>,
    server_tx_count: AtomicUsize,
    server_tx_bytes: AtomicUsize,
    expiry: Mutex<VecDeque<(Instant, Box<str>)>>,
    client_txs: DashMap<Box<str>, mpsc::Sender<Response>>,
    handler: OnceLock<Arc<dyn Handler>>,
    cancel: CancellationToken,
}

#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl Endpoint {
    /// Binds every listener; fails naming the first address that could not be bound.
    pub async fn bind(config: EndpointConfig, cancel: CancellationToken) -> Result<Self, SipError> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for &(transport, addr) in &config.listen {
            let bind_err = |source| SipError::Bind {
                transport: transport.as_str(),
                addr,
                source,
            };
            match transport {
                Transport::Udp => {
                    let s = bind_udp(addr, config.udp_buffer_bytes).map_err(bind_err)?;
                    udp.push((s.local_addr().map_err(bind_err)?, Arc::new(s)));
                }
                Transport::Tcp => {
                    let l = TcpListener::bind(addr).await.map_err(bind_err)?;
                    tcp.push((l.local_addr().map_err(bind_err)?, Arc::new(l)));
                }
            }
        }
        let slots = Arc::new(Semaphore::new(config.max_tcp_connections));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                udp,
                tcp,
                conns: DashMap::new(),
                conn_by_remote: DashMap::new(),
                next_conn: AtomicU64::new(1),
                conn_slots: slots,
                server_txs: DashMap::new(),
                server_tx_count: AtomicUsize::new(0),
                server_tx_bytes: AtomicUsize::new(0),
                expiry: Mutex::new(VecDeque::new()),
                client_txs: DashMap::new(),
                handler: OnceLock::new(),
                cancel,
            }),
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(Transport, SocketAddr)> {
        let udp = self.inner.udp.iter().map(|(a, _)| (Transport::Udp, *a));
        let tcp = self.inner.tcp.iter().map(|(a, _)| (Transport::Tcp, *a));
        udp.chain(tcp).collect()
    }

    /// Starts the receive loops; they stop when the cancellation token fires.
    pub fn start(&self, handler: Arc<dyn Handler>) -> tokio::task::JoinSet<()> {
        let _ = self.inner.handler.set(handler);
        let mut tasks = tokio::task::JoinSet::new();
        for (local, socket) in &self.inner.udp {
            for _ in 0..self.inner.config.udp_workers.max(1) {
                tasks.spawn(udp_loop(self.inner.clone(), *local, socket.clone()));
            }
        }
        for (_, listener) in &self.inner.tcp {
            tasks.spawn(accept_loop(self.inner.clone(), listener.clone()));
        }
        tasks.spawn(expiry_loop(self.inner.clone()));
        tasks
    }

    pub fn server_transactions(&self) -> usize {
        self.inner.server_tx_count.load(Ordering::Relaxed)
    }

    pub fn open_connections(&self) -> usize {
        self.inner.conns.len()
    }

    /// Whether a stream connection is still open.
    pub fn is_connected(&self, conn: ConnId) -> bool {
        self.inner.conns.contains_key(&conn)
    }

    /// A flow from one of our listeners of `transport` to `remote`, for peers we have not heard from.
    pub fn flow_to(&self, transport: Transport, remote: SocketAddr) -> Result<Flow, SipError> {
        let local = self
            .local_addrs()
            .into_iter()
            .find(|(t, a)| *t == transport && a.is_ipv4() == remote.is_ipv4())
            .map(|(_, a)| a)
            .ok_or(SipError::NoListener(transport.as_str()))?;
        Ok(Flow {
            transport,
            local,
            remote,
            conn: None,
        })
    }

    /// Sends a request as a client transaction over `flow` and returns its final response.
    /// A Via with a fresh branch is put on top. Timer F ends it with [`SipError::Timeout`].
    pub async fn send_request(&self, mut req: Request, flow: Flow) -> Result<Response, SipError> {
        let branch: Box<str> = format!("z9hG4bK{}", crate::random_token(16)).into();
        let local = flow.local;
        req.headers.prepend(
            "Via",
            format!(
                "SIP/2.0/{} {local};branch={branch};rport",
                flow.transport.via_name()
            ),
        );
        let (tx, mut rx) = mpsc::channel(4);
        self.inner.client_txs.insert(branch.clone(), tx);
        let _cleanup = ClientTxGuard(&self.inner, branch);
        let bytes = req.to_bytes();
        send_on_flow(&self.inner, flow, bytes.clone()).await?;
        let deadline = Instant::now() + TIMER_F;
        let mut interval = T1;
        let mut next = Instant::now() + interval;
        let mut proceeding = false;
        loop {
            tokio::select! {
                resp = rx.recv() => match resp {
                    Some(r) if r.code < 200 => proceeding = true,
                    Some(r) => return Ok(r),
                    None => return Err(SipError::ShuttingDown),
                },
                _ = tokio::time::sleep_until(next), if flow.transport == Transport::Udp => {
                    send_on_flow(&self.inner, flow, bytes.clone()).await?;
                    interval = if proceeding { T2 } else { (interval * 2).min(T2) };
                    next += interval;
                }
                _ = tokio::time::sleep_until(deadline) => return Err(SipError::Timeout(flow.remote)),
                _ = self.inner.cancel.cancelled() => return Err(SipError::ShuttingDown),
            }
        }
    }
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer than asked for still works, it only drops bursts sooner.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

struct ClientTxGuard<'a>(&'a Inner, Box<str>);

impl Drop for ClientTxGuard<'_> {
    fn drop(&mut self) {
        self.0.client_txs.remove(&self.1);
    }
}

/// A server transaction handed to the application.
pub struct ServerTx {
    pub request: Request,
    pub flow: Flow,
    /// Where responses go (RFC 3261 §18.2.2), worked out once from the top Via.
    reply_to: Flow,
    key: Option<Box<str>>,
    inner: Arc<Inner>,
    answered: bool,
}

impl ServerTx {
    /// Sends the final response and remembers it for retransmissions. Never blocks.
    pub fn respond(mut self, response: Response) {
        self.answered = true;
        let bytes = response.to_bytes();
        send_nowait(&self.inner, self.reply_to, bytes.clone());
        if let Some(key) = self.key.take() {
            complete(&self.inner, key, bytes, self.flow.transport);
        }
    }
}

impl Drop for ServerTx {
    fn drop(&mut self) {
        if !self.answered && self.request.method != Method::Ack {
            let bytes = Response::to(&self.request, 500).to_bytes();
            send_nowait(&self.inner, self.reply_to, bytes.clone());
            if let Some(key) = self.key.take() {
                complete(&self.inner, key, bytes, self.flow.transport);
            }
        }
    }
}

fn forget_tx(inner: &Inner, key: &str) {
    if let Some((key, state)) = inner.server_txs.remove(key) {
        let held = key.len()
            + if let TxState::Completed(b) = state {
                b.len()
            } else {
                0
            };
        inner.server_tx_count.fetch_sub(1, Ordering::Relaxed);
        inner.server_tx_bytes.fetch_sub(held, Ordering::Relaxed);
    }
}

fn complete(inner: &Inner, key: Box<str>, bytes: Bytes, transport: Transport) {
    if transport.is_reliable() {
        // Timer J is zero on reliable transports: nothing will be retransmitted.
        forget_tx(inner, &key);
        return;
    }
    if let Some(mut state) = inner.server_txs.get_mut(&key) {
        inner
            .server_tx_bytes
            .fetch_add(bytes.len(), Ordering::Relaxed);
        *state = TxState::Completed(bytes);
    }
    inner
        .expiry
        .lock()
        .expect("expiry lock")
        .push_back((Instant::now() + TIMER_F, key));
}

/// RFC 3261 §18.2.2 with RFC 3581: over UDP, to the source port when the client asked for rport,
/// else to the source IP and the port in Via; streams answer on their connection.
fn response_destination(req: &Request, flow: &Flow) -> Flow {
    match req.top_via() {
        Ok(via) => reply_flow(&via, flow),
        Err(_) => *flow,
    }
}

fn reply_flow(via: &Via, flow: &Flow) -> Flow {
    if flow.transport == Transport::Udp && via.params.get("rport").is_none() {
        let mut f = *flow;
        f.remote.set_port(via.port.unwrap_or(5060));
        return f;
    }
    *flow
}

fn transaction_key(req: &Request, via: &Via) -> Box<str> {
    let method = match req.method {
        Method::Ack => "INVITE",
        ref m => m.as_str(),
    };
    match via.branch() {
        Some(b) if b.starts_with("z9hG4bK") => format!("{b}|{}|{method}", via.sent_by()).into(),
        // RFC 2543 peers: fall back to the dialog-ish identifiers (§17.2.3).
        _ => {
            let from_tag = req
                .headers
                .get("From")
                .and_then(crate::uri::NameAddr::parse)
                .and_then(|n| n.param("tag").map(str::to_string))
                .unwrap_or_default();
            format!(
                "{}|{}|{from_tag}|{}|{}",
                req.call_id(),
                req.headers.get("CSeq").unwrap_or_default(),
                via.sent_by(),
                req.uri
            )
            .into()
        }
    }
}

/// Sends without waiting: UDP tries the socket once and falls back to a task; streams queue.
fn send_nowait(inner: &Arc<Inner>, flow: Flow, bytes: Bytes) {
    if flow.transport == Transport::Udp {
        if let Some(sock) = udp_socket(inner, flow.local) {
            match sock.try_send_to(&bytes, flow.remote) {
                Ok(_) => return,
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    tracing::debug!(remote = %flow.remote, error = %e, "udp send failed");
                    return;
                }
                Err(_) => {}
            }
        }
    } else if let Some(conn) = flow.conn.and_then(|c| inner.conns.get(&c)) {
        match conn.tx.try_send(bytes.clone()) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The peer does not read what we send: drop it rather than queue without end.
                tracing::debug!(remote = %flow.remote, "closing a connection whose peer does not read");
                conn.closed.cancel();
                return;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        if let Err(e) = send_on_flow(&inner, flow, bytes).await {
            tracing::debug!(error = %e, "send failed");
        }
    });
}

fn udp_socket(inner: &Inner, local: SocketAddr) -> Option<&Arc<UdpSocket>> {
    inner
        .udp
        .iter()
        .find(|(a, _)| *a == local)
        .or_else(|| inner.udp.first())
        .map(|(_, s)| s)
}

/// Sends over the flow; a stream whose connection is gone is reopened to the peer's address.
async fn send_on_flow(inner: &Arc<Inner>, flow: Flow, bytes: Bytes) -> Result<(), SipError> {
    let send_err = |source| SipError::Send {
        addr: flow.remote,
        source,
    };
    match flow.transport {
        Transport::Udp => {
            let sock = udp_socket(inner, flow.local).ok_or(SipError::NoListener("udp"))?;
            sock.send_to(&bytes, flow.remote).await.map_err(send_err)?;
            Ok(())
        }
        Transport::Tcp => {
            let existing = flow
                .conn
                .filter(|c| inner.conns.contains_key(c))
                .or_else(|| inner.conn_by_remote.get(&flow.remote).map(|c| *c));
            let sender = match existing.and_then(|c| inner.conns.get(&c).map(|c| c.tx.clone())) {
                Some(tx) => tx,
                None => connect(inner, flow.remote).await?,
            };
            sender.send(bytes).await.map_err(|_| {
                send_err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "connection closed",
                ))
            })
        }
    }
}

async fn connect(inner: &Arc<Inner>, remote: SocketAddr) -> Result<mpsc::Sender<Bytes>, SipError> {
    let permit = inner
        .conn_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| SipError::Send {
            addr: remote,
            source: std::io::Error::other("too many connections"),
        })?;
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(remote))
        .await
        .map_err(|_| SipError::Send {
            addr: remote,
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| SipError::Send {
            addr: remote,
            source,
        })?;
    let local = stream.local_addr().map_err(|source| SipError::Send {
        addr: remote,
        source,
    })?;
    Ok(run_connection(inner.clone(), stream, local, remote, permit))
}

async fn udp_loop(inner: Arc<Inner>, local: SocketAddr, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, remote) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // ICMP port unreachable from an earlier send surfaces here on some systems.
                Err(e) => { tracing::debug!(error = %e, "udp recv"); continue; }
            },
            _ = inner.cancel.cancelled() => return,
        };
        let data = &buf[..len];
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            continue; // keep-alive
        }
        let flow = Flow {
            transport: Transport::Udp,
            local,
            remote,
            conn: None,
        };
        match decode_datagram(data) {
            Ok(msg) => dispatch(&inner, msg, flow),
            Err((head, err)) => refuse(&inner, head, err, flow),
        }
    }
}

/// A datagram, or the head that could be read before the error (to answer 400 with).
fn decode_datagram(data: &[u8]) -> Result<Message, (Option<Head>, ParseError)> {
    let end = crate::message::head_end(data).ok_or((None, ParseError::Incomplete))?;
    let head = Head::parse(&data[..end]).map_err(|e| (None, e))?;
    let available = data.len() - end;
    let len = match head.content_length() {
        Ok(len) => len.unwrap_or(available),
        Err(e) => return Err((Some(head), e)),
    };
    if len > available {
        return Err((
            Some(head),
            ParseError::Truncated {
                got: available,
                want: len,
            },
        ));
    }
    Ok(head.into_message(Bytes::copy_from_slice(&data[end..end + len])))
}

/// Answers 400 to a request we could read the head of; anything else is dropped.
fn refuse(inner: &Arc<Inner>, head: Option<Head>, err: ParseError, flow: Flow) {
    if let Some(h) = inner.handler.get() {
        h.on_refused(flow.remote, &err);
    }
    tracing::debug!(remote = %flow.remote, error = %err, "refused malformed message");
    let Some(Message::Request(req)) = head.map(|h| h.into_message(Bytes::new())) else {
        return;
    };
    if req.method == Method::Ack || req.headers.get("Via").is_none() {
        return;
    }
    let resp = Response::with_reason(&req, 400, &format!("Bad Request ({err})"));
    send_nowait(inner, response_destination(&req, &flow), resp.to_bytes());
}

fn dispatch(inner: &Arc<Inner>, msg: Message, flow: Flow) {
    match msg {
        Message::Response(resp) => {
            let branch = resp
                .headers
                .list("Via")
                .next()
                .and_then(Via::parse)
                .and_then(|v| v.branch().map(str::to_string));
            if let Some(tx) =
                branch.and_then(|b| inner.client_txs.get(b.as_str()).map(|t| t.clone()))
            {
                let _ = tx.try_send(resp);
            }
        }
        Message::Request(mut req) => {
            if let Err(err) = req.check_mandatory() {
                let head = Head {
                    start: crate::message::StartLine::Request {
                        method: req.method.clone(),
                        uri: req.uri.clone(),
                    },
                    headers: req.headers,
                };
                return refuse(inner, Some(head), err, flow);
            }
            let Ok(mut via) = req.top_via() else {
                let head = Head {
                    start: crate::message::StartLine::Request {
                        method: req.method.clone(),
                        uri: req.uri.clone(),
                    },
                    headers: req.headers,
                };
                return refuse(inner, Some(head), ParseError::BadHeader("Via"), flow);
            };
            let too_long = via.branch().is_some_and(|b| b.len() > MAX_KEY_FIELD)
                || req.call_id().len() > MAX_KEY_FIELD
                || via.host.len() > MAX_KEY_FIELD;
            if too_long {
                let head = Head {
                    start: crate::message::StartLine::Request {
                        method: req.method.clone(),
                        uri: req.uri.clone(),
                    },
                    headers: req.headers,
                };
                return refuse(
                    inner,
                    Some(head),
                    ParseError::BadHeader("Via or Call-ID (too long)"),
                    flow,
                );
            }
            via.set_received(flow.remote);
            req.headers.replace_first_list_item("Via", &via.to_string());
            if req.method == Method::Ack {
                return; // ACK for a non-2xx we never sent; nothing to do for a UAS without INVITE.
            }
            let reply_to = reply_flow(&via, &flow);
            let key = transaction_key(&req, &via);
            match inner.server_txs.entry(key.clone()) {
                dashmap::Entry::Occupied(e) => {
                    if let TxState::Completed(bytes) = e.get() {
                        let bytes = bytes.clone();
                        drop(e);
                        send_nowait(inner, reply_to, bytes);
                    }
                    return; // absorbed: the handler already has it
                }
                dashmap::Entry::Vacant(v) => {
                    let full = inner.server_tx_count.load(Ordering::Relaxed)
                        >= inner.config.max_server_transactions
                        || inner.server_tx_bytes.load(Ordering::Relaxed)
                            >= inner.config.max_server_transaction_bytes;
                    if full {
                        drop(v);
                        let resp = Response::to(&req, 503).header("Retry-After", "5");
                        send_nowait(inner, reply_to, resp.to_bytes());
                        return;
                    }
                    inner
                        .server_tx_bytes
                        .fetch_add(key.len(), Ordering::Relaxed);
                    v.insert(TxState::Proceeding);
                    inner.server_tx_count.fetch_add(1, Ordering::Relaxed);
                }
            }
            let tx = ServerTx {
                request: req,
                flow,
                reply_to,
                key: Some(key),
                inner: inner.clone(),
                answered: false,
            };
            match inner.handler.get() {
                Some(h) => h.on_request(tx),
                None => drop(tx),
            }
        }
    }
}

async fn expiry_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = inner.cancel.cancelled() => return,
        }
        let now = Instant::now();
        loop {
            let expired = {
                let mut q = inner.expiry.lock().expect("expiry lock");
                match q.front() {
                    Some((at, _)) if *at <= now => q.pop_front(),
                    _ => None,
                }
            };
            let Some((_, key)) = expired else { break };
            forget_tx(&inner, &key);
        }
        // After a burst the tables keep their peak capacity; give it back once mostly empty.
        let capacity = inner.server_txs.capacity();
        if capacity > 4096 && inner.server_txs.len() * 8 < capacity {
            inner.server_txs.shrink_to_fit();
            inner.expiry.lock().expect("expiry lock").shrink_to_fit();
        }
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: Arc<TcpListener>) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    loop {
        // Take a slot before accepting, so a full server stops accepting instead of queueing.
        let permit = tokio::select! {
            p = inner.conn_slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = inner.cancel.cancelled() => return,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = inner.cancel.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        run_connection(inner.clone(), stream, local, remote, permit);
    }
}

/// Registers a connection and spawns its reader and writer; returns its send queue.
fn run_connection(
    inner: Arc<Inner>,
    stream: TcpStream,
    local: SocketAddr,
    remote: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> mpsc::Sender<Bytes> {
    let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    let closed = CancellationToken::new();
    inner.conns.insert(
        id,
        Connection {
            tx: tx.clone(),
            closed: closed.clone(),
        },
    );
    inner.conn_by_remote.insert(remote, id);
    let (mut reader, mut writer) = stream.into_split();
    let writer_closed = closed.clone();
    let writer_cancel = inner.cancel.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(bytes) => {
                        let written = tokio::time::timeout(WRITE_DEADLINE, writer.write_all(&bytes)).await;
                        if !matches!(written, Ok(Ok(()))) { break }
                    }
                    None => break,
                },
                _ = writer_closed.cancelled() => break,
                _ = writer_cancel.cancelled() => break,
            }
        }
        let _ = writer.shutdown().await;
        writer_closed.cancel();
    });
    let flow = Flow {
        transport: Transport::Tcp,
        local,
        remote,
        conn: Some(id),
    };
    let reader_inner = inner.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let inner = reader_inner;
        let mut decoder = StreamDecoder::new(inner.config.max_body);
        let mut chunk = vec![0u8; 16 * 1024];
        let mut partial_since: Option<Instant> = None;
        'conn: loop {
            let wait = match partial_since {
                Some(t) => MESSAGE_DEADLINE.saturating_sub(t.elapsed()),
                None => inner.config.tcp_idle_timeout,
            };
            let n = tokio::select! {
                r = tokio::time::timeout(wait, reader.read(&mut chunk)) => match r {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                },
                _ = closed.cancelled() => break,
                _ = inner.cancel.cancelled() => break,
            };
            decoder.buf.extend_from_slice(&chunk[..n]);
            loop {
                match decoder.next_frame() {
                    Ok(None) => break,
                    Ok(Some(Frame::Ping)) => {
                        if let Some(c) = inner.conns.get(&id) {
                            let _ = c.tx.try_send(Bytes::from_static(b"\r\n"));
                        }
                    }
                    Ok(Some(Frame::Message(msg))) => dispatch(&inner, msg, flow),
                    Err((head, err)) => {
                        // The stream cannot be framed any more: answer if we can, then close.
                        refuse(&inner, head, err, flow);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        break 'conn;
                    }
                }
            }
            partial_since = match (decoder.buf.is_empty(), partial_since) {
                (true, _) => None,
                (false, None) => Some(Instant::now()),
                (false, since) => since,
            };
        }
        closed.cancel();
        inner.conns.remove(&id);
        inner.conn_by_remote.remove_if(&remote, |_, c| *c == id);
        if let Some(h) = inner.handler.get() {
            h.on_connection_closed(id);
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Counting(AtomicUsize);

    impl Handler for Counting {
        fn on_request(&self, tx: ServerTx) {
            self.0.fetch_add(1, Ordering::SeqCst);
            let resp = Response::to(&tx.request, 200);
            tx.respond(resp);
        }
    }

    type Running = (tokio::task::JoinSet<()>, Endpoint);

    async fn endpoint() -> (Running, Arc<Counting>, SocketAddr) {
        let ep = Endpoint::bind(
            EndpointConfig {
                listen: vec![(Transport::Udp, "127.0.0.1:0".parse().unwrap())],
                udp_workers: 1,
                ..Default::default()
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let handler = Arc::new(Counting(AtomicUsize::new(0)));
        let tasks = ep.start(handler.clone());
        let addr = ep.local_addrs()[0].1;
        ((tasks, ep), handler, addr)
    }

    fn options(branch: &str) -> String {
        format!(
            "OPTIONS sip:gw SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch={branch};rport\r\n\
             From: <sip:a@b>;tag=1\r\nTo: <sip:gw>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
    }

    #[tokio::test]
    async fn retransmission_answered_from_transaction_handler_sees_one() {
        let (_ep, handler, addr) = endpoint().await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let req = options("z9hG4bKretrans");
        let mut answers = Vec::new();
        for _ in 0..3 {
            sock.send_to(req.as_bytes(), addr).await.unwrap();
            let mut buf = [0u8; 2048];
            let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            answers.push(buf[..n].to_vec());
        }
        assert_eq!(handler.0.load(Ordering::SeqCst), 1);
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "identical responses"
        );
        let text = String::from_utf8(answers[0].clone()).unwrap();
        assert!(text.starts_with("SIP/2.0 200 OK"));
        let port = sock.local_addr().unwrap().port();
        assert!(
            text.contains(&format!("rport={port};received=127.0.0.1")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bad_request_gets_400_and_server_keeps_going() {
        let (_ep, handler, addr) = endpoint().await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let no_cseq = options("z9hG4bKbad").replace("CSeq: 1 OPTIONS\r\n", "");
        sock.send_to(no_cseq.as_bytes(), addr).await.unwrap();
        let mut buf = [0u8; 2048];
        let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("SIP/2.0 400 Bad Request (missing mandatory header CSeq)"),
            "{text}"
        );
        sock.send_to(b"\x00\x01garbage", addr).await.unwrap();
        sock.send_to(options("z9hG4bKgood").as_bytes(), addr)
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"SIP/2.0 200 OK"));
        assert_eq!(handler.0.load(Ordering::SeqCst), 1);
    }

    /// Remembers the flow of each request, as the registrar does.
    struct FlowRecorder(Mutex<Vec<Flow>>);

    impl Handler for FlowRecorder {
        fn on_request(&self, tx: ServerTx) {
            self.0.lock().unwrap().push(tx.flow);
            let resp = Response::to(&tx.request, 200);
            tx.respond(resp);
        }
    }

    fn message_to(uri: &str) -> Request {
        let mut req = crate::message::Request {
            method: Method::Message,
            uri: uri.into(),
            headers: Default::default(),
            body: Bytes::from_static(b"hi"),
        };
        for (n, v) in [
            ("From", "<sip:gw@x>;tag=1"),
            ("To", "<sip:101@x>"),
            ("Call-ID", "c"),
            ("CSeq", "1 MESSAGE"),
        ] {
            req.headers.push(n, v);
        }
        req
    }

    #[tokio::test]
    async fn requests_to_a_tcp_flow_reuse_the_phones_connection() {
        let ep = Endpoint::bind(
            EndpointConfig {
                listen: vec![(Transport::Tcp, "127.0.0.1:0".parse().unwrap())],
                ..Default::default()
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let recorder = Arc::new(FlowRecorder(Mutex::new(Vec::new())));
        let _tasks = ep.start(recorder.clone());
        let addr = ep.local_addrs()[0].1;

        // The "phone": one TCP connection, used first to send a request.
        let mut phone = TcpStream::connect(addr).await.unwrap();
        let request = options("z9hG4bKtcp").replace("UDP", "TCP");
        phone.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = phone.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"SIP/2.0 200 OK"));
        let flow = recorder.0.lock().unwrap()[0];
        assert_eq!(flow.remote, phone.local_addr().unwrap());
        assert!(flow.conn.is_some_and(|c| ep.is_connected(c)));

        // The gateway sends on that flow: the MESSAGE arrives on the same connection.
        let sender = ep.clone();
        let pending = tokio::spawn(async move {
            sender
                .send_request(message_to("sip:101@10.9.9.9"), flow)
                .await
        });
        let n = phone.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            text.starts_with("MESSAGE sip:101@10.9.9.9 SIP/2.0"),
            "{text}"
        );
        let Ok(Message::Request(msg)) = crate::message::parse_datagram(&buf[..n]) else {
            panic!("not a request: {text}")
        };
        let answer = Response::to(&msg, 200);
        phone.write_all(&answer.to_bytes()).await.unwrap();
        let final_response = pending.await.unwrap().unwrap();
        assert_eq!(final_response.code, 200);
    }

    #[tokio::test(start_paused = true)]
    async fn client_retransmits_on_timer_e_and_times_out_on_timer_f() {
        let ((_tasks, ep), _handler, _addr) = endpoint().await;
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_nonblocking(true).unwrap();
        let flow = ep
            .flow_to(Transport::Udp, sink.local_addr().unwrap())
            .unwrap();
        let req = message_to("sip:101@127.0.0.1");
        let started = Instant::now();
        let result = ep.send_request(req, flow).await;
        assert!(matches!(result, Err(SipError::Timeout(_))));
        assert_eq!(started.elapsed(), TIMER_F);
        // 0, 0.5, 1.5, 3.5, 7.5, 11.5, ... 31.5 s: 11 sends in all.
        let mut buf = [0u8; 2048];
        let mut count = 0;
        while sink.recv(&mut buf).is_ok() {
            count += 1;
        }
        assert_eq!(count, 11);
    }
}
