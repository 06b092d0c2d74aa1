//! Wiring: opens the store, binds every listener, starts the tasks, and shuts down gracefully.

use crate::config::Settings;
use crate::http::{admin_router, webhook_router, AdminState};
use crate::messaging::Messaging;
use crate::metrics::Metrics;
use crate::registration::{
    from_stored, housekeeping, persist_bindings, unix_now, DirtyAors, Ha1, SipService,
};
use crate::store::{SqliteStore, Store, StoreError};
use smsgw_sip::digest::{Algorithm, DigestConfig, DigestServer};
use smsgw_sip::guard::{AuthGuard, GuardConfig};
use smsgw_sip::registrar::{ExpiryLimits, Registrar, RegistrarConfig};
use smsgw_sip::{Endpoint, EndpointConfig, SipError, Transport};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sip(#[from] SipError),
    #[error("cannot listen on {key} = {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read or create the nonce key {path}: {source}")]
    NonceKey {
        path: String,
        source: std::io::Error,
    },
}

/// The key that signs digest nonces, kept in the data directory so that nonces handed out before
/// a restart stay valid after it.
fn nonce_key(path: &Path) -> Result<[u8; 32], AppError> {
    let err = |source| AppError::NonceKey {
        path: path.display().to_string(),
        source,
    };
    if let Ok(bytes) = std::fs::read(path) {
        if let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(key);
        }
    }
    let key: [u8; 32] = rand::random();
    let tmp = path.with_extension(format!("tmp-{}", smsgw_sip::random_token(12)));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(err)?;
    std::io::Write::write_all(&mut file, &key).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(key)
}

/// Runs the gateway until `shutdown` completes, then drains within the grace period.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let settings = Arc::new(settings);
    // Two phases at shutdown: `intake` (SIP, HTTP) stops first, then `background` (persistence,
    // housekeeping) gets to save what intake left behind.
    let intake = CancellationToken::new();
    let background = CancellationToken::new();
    let store = SqliteStore::open(&settings.gateway.data_dir).await?;
    let key_path = settings.gateway.data_dir.join("nonce.key");
    let key = tokio::task::spawn_blocking(move || nonce_key(&key_path))
        .await
        .expect("nonce key task")?;
    let metrics = Arc::new(Metrics::new());
    let sip = &settings.sip;
    let registrar = Arc::new(Registrar::new(RegistrarConfig {
        limits: ExpiryLimits {
            min: sip.min_expires,
            max: sip.max_expires,
            default: sip.default_expires,
        },
        max_contacts_per_aor: sip.max_contacts_per_extension,
    }));
    restore_bindings(&store, &registrar).await?;

    let udp_workers = match sip.udp_workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let endpoint = Endpoint::bind(
        EndpointConfig {
            listen: sip.listen.clone(),
            udp_workers,
            max_body: sip.max_message_bytes,
            max_tcp_connections: sip.max_tcp_connections,
            tcp_idle_timeout: Duration::from_secs(u64::from(sip.max_expires) + 60),
            ..EndpointConfig::default()
        },
        intake.clone(),
    )
    .await?;
    let bind = |key, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { key, addr, source })
    };
    let webhook_listener = bind("http.webhook_listen", settings.http.webhook_listen).await?;
    let admin_listener = bind("http.admin_listen", settings.http.admin_listen).await?;
    let webhook_addr = webhook_listener
        .local_addr()
        .unwrap_or(settings.http.webhook_listen);
    let admin_addr = admin_listener
        .local_addr()
        .unwrap_or(settings.http.admin_listen);

    let realm = settings.gateway.domain.clone();
    let users = settings
        .extensions
        .iter()
        .map(|e| {
            let id = e.id.as_str();
            (Box::from(id), Ha1::new(id, &realm, e.password.expose()))
        })
        .collect::<HashMap<_, _>>();
    let algorithms = if sip.digest_md5_only {
        vec![Algorithm::Md5]
    } else {
        vec![Algorithm::Sha256, Algorithm::Md5]
    };
    let dirty = Arc::new(DirtyAors::default());
    let service = Arc::new(SipService {
        messaging: std::sync::OnceLock::new(),
        registrar: registrar.clone(),
        digest: DigestServer::with_key(
            DigestConfig {
                realm,
                algorithms,
                nonce_lifetime_secs: sip.nonce_lifetime_secs,
                max_tracked_nonces: 1_000_000,
            },
            key,
        ),
        guard: AuthGuard::new(GuardConfig {
            max_failures: sip.auth_max_failures,
            window: Duration::from_secs(sip.auth_failure_window_secs),
            cooldown: Duration::from_secs(sip.auth_block_secs),
            max_tracked: 100_000,
        }),
        users,
        metrics: metrics.clone(),
        dirty: dirty.clone(),
    });

    let messaging = Messaging::new(
        settings.clone(),
        store.clone(),
        endpoint.clone(),
        registrar.clone(),
        metrics.clone(),
    )
    .await?;
    let _ = service.messaging.set(messaging.clone());
    let simulator = match &settings.simulator {
        Some(sim) => Some((bind("simulator.listen", sim.listen).await?, sim)),
        None => None,
    };
    // Single instance: whatever a previous run had leased is ours to retry (after reconciling
    // with Twilio). Done before intake starts, so no fresh message is mistaken for a leftover.
    store
        .release_outbound_leases(crate::messaging::now_ms())
        .await?;
    let mut intake_tasks = endpoint.start(service.clone());
    let mut background_tasks = tokio::task::JoinSet::new();
    background_tasks.spawn(persist_bindings(
        store.clone(),
        registrar.clone(),
        dirty,
        metrics.clone(),
        background.clone(),
    ));
    background_tasks.spawn(housekeeping(
        service.clone(),
        endpoint.clone(),
        background.clone(),
    ));
    // In-flight sends are not awaited at shutdown: each one's row is marked in doubt before
    // its request goes out, and is reconciled with Twilio after the restart.
    background_tasks.spawn(messaging.clone().outbox_loop(background.clone()));
    background_tasks.spawn(messaging.clone().inbox_loop(background.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let admin = admin_router(AdminState {
        registrar,
        metrics,
        admin_token: settings.http.admin_token.clone(),
        ready: ready.clone(),
        messaging: Some(messaging.clone()),
    });
    let mut listeners = vec![
        (webhook_listener, webhook_router(messaging.clone())),
        (admin_listener, admin),
    ];
    if let Some((listener, sim)) = simulator {
        let sms = &settings.sms[0];
        let public_base = format!("http://{}", listener.local_addr().unwrap_or(sim.listen));
        tracing::info!(listen = %public_base, "running the built-in Twilio stand-in (demo only)");
        let config = crate::twilio::sim::SimConfig {
            account_sid: sms.account_sid.clone(),
            auth_token: sms.auth_token.clone(),
            api_keys: match &sms.auth {
                crate::config::TwilioAuth::ApiKey { sid, secret } => {
                    vec![(sid.clone(), secret.clone())]
                }
                crate::config::TwilioAuth::AuthToken => vec![],
            },
            numbers: settings
                .sms
                .iter()
                .flat_map(|s| s.dids.iter().map(ToString::to_string))
                .collect(),
            spec: None,
            callback_delay: sim.callback_delay,
            default_webhook: Some(messaging.webhook_url(0)),
            public_base,
        };
        listeners.push((listener, crate::twilio::sim::router(config)));
    }
    for (listener, router) in listeners {
        let stop = intake.clone();
        intake_tasks.spawn(async move {
            let served = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http listener failed");
            }
        });
    }

    store.ping().await?;
    ready.store(true, Ordering::Release);
    let addrs = endpoint.local_addrs();
    let list = |t: Transport| {
        addrs
            .iter()
            .filter(|(tr, _)| *tr == t)
            .map(|(_, a)| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    tracing::info!(
        sip_udp = %list(Transport::Udp),
        sip_tcp = %list(Transport::Tcp),
        webhook = %webhook_addr,
        admin = %admin_addr,
        "smsgw ready"
    );

    shutdown.await;
    tracing::info!("shutting down: no new work is taken; saving registrations");
    ready.store(false, Ordering::Release);
    let deadline = tokio::time::Instant::now() + settings.gateway.shutdown_grace;
    intake.cancel();
    drain(&mut intake_tasks, deadline, "intake").await;
    background.cancel();
    // The final save gets at least a second even if intake used up the grace period.
    let save_deadline =
        deadline.max(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
    drain(&mut background_tasks, save_deadline, "background").await;
    tracing::info!("stopped");
    Ok(())
}

async fn drain(tasks: &mut tokio::task::JoinSet<()>, deadline: tokio::time::Instant, what: &str) {
    let joined = tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!(
            what,
            "tasks still running after the grace period; exiting anyway"
        );
    }
}

async fn restore_bindings(store: &SqliteStore, registrar: &Registrar) -> Result<(), StoreError> {
    let now = tokio::time::Instant::now();
    let now_unix = unix_now();
    let mut by_aor: HashMap<String, Vec<_>> = HashMap::new();
    for b in store.load_bindings(now_unix as i64).await? {
        by_aor
            .entry(b.aor.clone())
            .or_default()
            .push(from_stored(b, now, now_unix));
    }
    let count: usize = by_aor.values().map(Vec::len).sum();
    for (aor, bindings) in by_aor {
        registrar.restore(&aor, bindings);
    }
    tracing::info!(bindings = count, "restored registrations from the store");
    Ok(())
}
