//! Embedded SQLite (WAL). One dedicated thread owns the connection, so blocking database work
//! never runs on the async runtime's workers; callers queue jobs on a bounded channel.
//!
//! Group commit: the thread takes every job that is waiting (up to a batch), runs each inside its
//! own savepoint of one transaction, commits once, and only then answers the callers. A caller
//! that got `Ok` knows its write is on disk; a thousand concurrent writers cost one fsync.

use super::{
    Advance, Direction, Kind, Message, MessageFilter, NewMessage, Recorded, StatusCallback, Store,
    StoreError, StoredBinding, Update,
};
use rusqlite::{params, Connection, OptionalExtension, Row};
use smsgw_rules::MessageStatus;
use smsgw_sip::Transport;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most jobs committed together.
const BATCH: usize = 512;
/// Commits are at least this far apart; an idle store commits at once.
const MIN_COMMIT_GAP: std::time::Duration = std::time::Duration::from_micros(500);

/// Versioned schema changes, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: registrations
    "CREATE TABLE bindings (
        aor         TEXT NOT NULL,
        contact     TEXT NOT NULL,
        transport   TEXT NOT NULL,
        local_addr  TEXT NOT NULL,
        remote_addr TEXT NOT NULL,
        expires_at  INTEGER NOT NULL,
        call_id     TEXT NOT NULL,
        cseq        INTEGER NOT NULL,
        instance    TEXT,
        reg_id      INTEGER
    );
    CREATE INDEX bindings_aor ON bindings (aor);
    CREATE INDEX bindings_expiry ON bindings (expires_at);",
    // 2: messages (outbox, inbox and history), opt-outs, webhook tokens, seen webhooks, media
    "CREATE TABLE messages (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        direction       TEXT NOT NULL,
        kind            TEXT NOT NULL,
        sms_config      TEXT NOT NULL,
        extension       TEXT,
        trunk           TEXT,
        remote          TEXT NOT NULL,
        sender          TEXT NOT NULL,
        body            TEXT NOT NULL,
        media           TEXT NOT NULL,
        twilio_sid      TEXT,
        status          TEXT NOT NULL,
        error_code      INTEGER,
        error_message   TEXT,
        segments        INTEGER NOT NULL,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        attempts        INTEGER NOT NULL,
        next_attempt_at INTEGER,
        expires_at      INTEGER,
        in_doubt        INTEGER NOT NULL,
        reconcile       INTEGER NOT NULL DEFAULT 0,
        lease           INTEGER NOT NULL DEFAULT 0,
        meta            TEXT NOT NULL
    );
    CREATE INDEX messages_queue ON messages (direction, next_attempt_at) WHERE next_attempt_at IS NOT NULL;
    CREATE INDEX messages_sid_in ON messages (twilio_sid) WHERE twilio_sid IS NOT NULL AND direction = 'inbound';
    CREATE UNIQUE INDEX messages_sid_out ON messages (twilio_sid) WHERE twilio_sid IS NOT NULL AND direction = 'outbound';
    CREATE INDEX messages_remote ON messages (remote, direction, created_at);
    CREATE INDEX messages_extension ON messages (extension, created_at);
    CREATE TABLE opt_outs (
        remote     TEXT NOT NULL,
        sender     TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (remote, sender)
    );
    CREATE TABLE webhook_tokens (
        sms_config TEXT PRIMARY KEY,
        token      TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE seen_webhooks (
        key         TEXT PRIMARY KEY,
        received_at INTEGER NOT NULL
    );
    CREATE TABLE media (
        token        TEXT PRIMARY KEY,
        content_type TEXT NOT NULL,
        data         BLOB NOT NULL,
        expires_at   INTEGER NOT NULL
    );",
    // 3: fewer, narrower indexes, since every one is written on every message: an outbox index
    // and an inbox index (a mailbox's size and its next messages cost what waits in it, not the
    // extension's whole history); no index on inbound SIDs (nothing looks them up); the
    // webhook dedupe keys in one B-tree instead of a table plus its key index
    "DROP INDEX messages_sid_in;
    DROP INDEX messages_queue;
    CREATE INDEX messages_outbox ON messages (next_attempt_at)
        WHERE direction = 'outbound' AND next_attempt_at IS NOT NULL;
    CREATE INDEX messages_inbox ON messages (extension, trunk, id)
        WHERE direction = 'inbound' AND next_attempt_at IS NOT NULL;
    CREATE TABLE seen_webhooks_v3 (
        key         TEXT PRIMARY KEY,
        received_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO seen_webhooks_v3 (key, received_at) SELECT key, received_at FROM seen_webhooks;
    DROP TABLE seen_webhooks;
    ALTER TABLE seen_webhooks_v3 RENAME TO seen_webhooks;",
    // 4: no index on outbound SIDs. Twilio's SIDs are random, so each sent message wrote a
    // random leaf of an index as large as the history (two fifths of the bytes written per
    // message). Status callbacks carry our message id in their URL instead, and the few lookups
    // by SID left (reconciliation, callbacks without an id) go through the recipient's entries
    // of `messages_remote`; a SID belongs to one recipient, so uniqueness per recipient is enough.
    "DROP INDEX messages_sid_out;",
];

const MESSAGE_COLUMNS: &str =
    "id, direction, kind, sms_config, extension, trunk, remote, sender, body, media, \
     twilio_sid, status, error_code, error_message, segments, created_at, updated_at, attempts, \
     next_attempt_at, expires_at, in_doubt, meta, reconcile, lease";

fn message_from_row(r: &Row<'_>) -> rusqlite::Result<Message> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            what.to_string().into(),
        )
    };
    let direction = match r.get::<_, String>(1)?.as_str() {
        "outbound" => Direction::Outbound,
        "inbound" => Direction::Inbound,
        _ => return Err(bad(1, "direction")),
    };
    let media: String = r.get(9)?;
    let meta: String = r.get(21)?;
    Ok(Message {
        id: r.get(0)?,
        direction,
        kind: Kind::parse(&r.get::<_, String>(2)?).ok_or_else(|| bad(2, "kind"))?,
        sms_config: r.get(3)?,
        extension: r.get(4)?,
        trunk: r.get(5)?,
        remote: r.get(6)?,
        sender: r.get(7)?,
        body: r.get(8)?,
        media: serde_json::from_str(&media).map_err(|_| bad(9, "media"))?,
        twilio_sid: r.get(10)?,
        status: MessageStatus::parse(&r.get::<_, String>(11)?).ok_or_else(|| bad(11, "status"))?,
        error_code: r.get(12)?,
        error_message: r.get(13)?,
        segments: r.get(14)?,
        created_at: r.get(15)?,
        updated_at: r.get(16)?,
        attempts: r.get(17)?,
        next_attempt_at: r.get(18)?,
        expires_at: r.get(19)?,
        in_doubt: r.get(20)?,
        meta: serde_json::from_str(&meta).map_err(|_| bad(21, "meta"))?,
        reconcile: r.get(22)?,
        lease: r.get(23)?,
    })
}

fn insert_message(conn: &Connection, m: &NewMessage) -> rusqlite::Result<i64> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO messages (direction, kind, sms_config, extension, trunk, remote, sender, body, media, twilio_sid,
             status, segments, created_at, updated_at, attempts, next_attempt_at, expires_at, in_doubt, meta, lease)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
    )?;
    stmt.execute(params![
        m.direction.as_str(),
        m.kind.as_str(),
        m.sms_config,
        m.extension,
        m.trunk,
        m.remote,
        m.sender,
        m.body,
        serde_json::to_string(&m.media).unwrap_or_else(|_| "[]".into()),
        m.twilio_sid,
        m.status.as_str(),
        m.segments,
        m.now,
        m.attempts,
        m.next_attempt_at,
        m.expires_at,
        m.in_doubt,
        m.meta.to_string(),
        m.lease,
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Runs inside the batch transaction; returns what to do once the commit's outcome is known.
type Job = Box<dyn FnOnce(&Connection) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A query on the reader connection.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// How often a background connection copies the WAL back into the database file. The copying
/// (a read and a write per page, then an fsync) runs beside the writer, not in its way: done by
/// the writer at this pace it held up every commit behind it for 4–19 ms at 7,000 messages/s.
/// More often would copy the pages every commit touches (the newest leaves) more often.
const BACKGROUND_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// How often the writer itself checkpoints, between batches. Only a checkpoint that copies the
/// whole WAL with no commit under way lets the next commit start the WAL over, so without this
/// the WAL would grow as long as writes go on. When it is due, the background connection first
/// copies what is there; the writer then copies only what was committed meanwhile (a few
/// milliseconds' worth), so its pause is short. The WAL file holds what is written in this time.
const WRITER_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Clone)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    reads: mpsc::Sender<ReadJob>,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/smsgw.db`, migrates it, and starts three threads: the
    /// writer (group commit, and a checkpoint twice a second that lets the WAL start over), a reader
    /// (queries never wait for a commit's fsync) and a checkpointer (copies the WAL into the
    /// database file beside the writer).
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        let (writer, reader, checkpointer) = tokio::task::spawn_blocking(move || {
            let writer = open_and_migrate(&dir)?;
            let reader = open_more(&dir)?;
            reader.pragma_update(None, "query_only", "ON")?;
            let checkpointer = open_more(&dir)?;
            Ok::<_, StoreError>((writer, reader, checkpointer))
        })
        .await
        .map_err(|_| StoreError::Closed)??;
        let thread_error =
            |e: std::io::Error| StoreError::Corrupt(format!("cannot start a database thread: {e}"));
        let (jobs, mut rx) = mpsc::channel::<Job>(4096);
        // The writer asks for a checkpoint ahead of its own; dropping the sender stops the thread.
        let (ask_ahead, asked_ahead) = std::sync::mpsc::channel::<()>();
        let writer_due = Arc::new(AtomicBool::new(false));
        let copied_ahead = Arc::new(AtomicBool::new(false));
        let background = (writer_due.clone(), copied_ahead.clone());
        std::thread::Builder::new()
            .name("smsgw-sqlite-ckpt".into())
            .spawn(move || background_checkpoints(checkpointer, asked_ahead, background))
            .map_err(thread_error)?;
        std::thread::Builder::new()
            .name("smsgw-sqlite".into())
            .spawn(move || {
                let conn = writer;
                let mut batch = Vec::with_capacity(BATCH);
                let mut last_commit = std::time::Instant::now();
                let mut last_checkpoint = last_commit;
                while let Some(first) = rx.blocking_recv() {
                    batch.push(first);
                    // Under load, let a batch gather for a moment: each commit costs its WAL
                    // pages and an fsync whether it carries one job or a hundred.
                    let since = last_commit.elapsed();
                    if since < MIN_COMMIT_GAP {
                        std::thread::sleep(MIN_COMMIT_GAP - since);
                    }
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    run_batch(&conn, &mut batch);
                    last_commit = std::time::Instant::now();
                    if last_checkpoint.elapsed() < WRITER_CHECKPOINT_EVERY {
                        continue;
                    }
                    let ready = if writer_due.swap(true, Ordering::AcqRel) {
                        copied_ahead.swap(false, Ordering::AcqRel)
                    } else {
                        // Without the background thread, copy everything now.
                        ask_ahead.send(()).is_err()
                    };
                    if ready {
                        // A failed checkpoint asks again after the next batch.
                        writer_due.store(false, Ordering::Release);
                        if checkpoint(&conn) {
                            last_checkpoint = std::time::Instant::now();
                        }
                    }
                }
            })
            .map_err(thread_error)?;
        let (reads, mut read_rx) = mpsc::channel::<ReadJob>(4096);
        std::thread::Builder::new()
            .name("smsgw-sqlite-read".into())
            .spawn(move || {
                while let Some(job) = read_rx.blocking_recv() {
                    job(&reader);
                }
            })
            .map_err(thread_error)?;
        Ok(Self { jobs, reads })
    }

    /// Runs `f` in its own savepoint of the next batch; resolves after the batch committed.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.submit(Isolation::Savepoint, f, |_| {}).await
    }

    /// Like `run`, for an `f` that makes one write statement at most.
    async fn run_one<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.submit(Isolation::OneStatement, f, |_| {}).await
    }

    /// Runs `f` in the next batch, isolated as asked; calls `committed` with the result on the
    /// database thread right after the commit, in commit order; resolves after the commit.
    async fn submit<T: Send + 'static>(
        &self,
        isolation: Isolation,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        committed: impl FnOnce(&T) + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn: &Connection| -> Reply {
                let result = match isolation {
                    Isolation::Savepoint => savepoint(conn, f),
                    Isolation::OneStatement => f(conn),
                };
                Box::new(move |commit: Result<(), String>| {
                    let result = commit.map_err(StoreError::Commit).and(result);
                    if let Ok(v) = &result {
                        committed(v);
                    }
                    let _ = tx.send(result);
                })
            }))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs a query on the reader connection; it sees every write whose `run` has returned.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.reads
            .send(Box::new(move |conn: &Connection| {
                let _ = tx.send(f(conn));
            }))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Copies the WAL into the database file (PASSIVE: a query under way on the reader is not
/// waited for; what it still reads is copied next time). False when another checkpoint was
/// under way.
fn checkpoint(conn: &Connection) -> bool {
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
        Ok(busy) => busy == 0,
        Err(e) => {
            tracing::warn!(error = %e, "database checkpoint failed");
            false
        }
    }
}

/// Checkpoints on its own connection until the writer thread ends (`asked_ahead` closes). While
/// the writer's own checkpoint is due (`writer_due`) it only copies when asked to, once, and then
/// says so (`copied_ahead`), so that the writer's checkpoint finds little left to copy and no
/// background checkpoint under way.
fn background_checkpoints(
    conn: Connection,
    asked_ahead: std::sync::mpsc::Receiver<()>,
    (writer_due, copied_ahead): (Arc<AtomicBool>, Arc<AtomicBool>),
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match asked_ahead.recv_timeout(BACKGROUND_CHECKPOINT_EVERY) {
            Ok(()) => {
                checkpoint(&conn);
                copied_ahead.store(true, Ordering::Release);
            }
            Err(RecvTimeoutError::Timeout) if !writer_due.load(Ordering::Acquire) => {
                checkpoint(&conn);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// How a job's writes are kept apart from the rest of its batch: a failing job must not fail
/// the others, nor leave half its writes behind.
#[derive(Clone, Copy)]
enum Isolation {
    /// In a savepoint of its own, so its writes stand or fall together.
    Savepoint,
    /// None needed: a single statement that fails is undone by SQLite itself. A savepoint costs
    /// two more statements and a copy of every page the job touches.
    OneStatement,
}

/// A job's writes stand or fall together, without failing the rest of the batch.
fn savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    match f(conn) {
        Ok(v) => {
            conn.prepare_cached("RELEASE job")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

fn run_batch(conn: &Connection, batch: &mut Vec<Job>) {
    let exec = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
    };
    let begun = exec("BEGIN IMMEDIATE").map_err(|e| e.to_string());
    let replies: Vec<Reply> = batch.drain(..).map(|job| job(conn)).collect();
    let outcome = begun.and_then(|_| {
        exec("COMMIT").map_err(|e| {
            let _ = exec("ROLLBACK");
            e.to_string()
        })
    });
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "database commit failed");
    }
    for reply in replies {
        reply(outcome.clone());
    }
}

fn open_and_migrate(dir: &Path) -> Result<Connection, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
        path: dir.display().to_string(),
        source,
    })?;
    let mut conn = open_more(dir)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // The writer thread does it between batches, outside the commit path.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// A connection to `dir/smsgw.db` with the settings every connection needs.
fn open_more(dir: &Path) -> Result<Connection, StoreError> {
    let path = dir.join("smsgw.db");
    let conn = Connection::open(&path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source,
    })?;
    // NORMAL in WAL mode is durable against process crashes (kill -9); FULL adds power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: current,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = i + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .and_then(|_| tx.pragma_update(None, "user_version", version))
            .map_err(|source| StoreError::Migration { version, source })?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

fn parse_addr(value: String) -> Result<std::net::SocketAddr, StoreError> {
    value
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("bad address {value:?} in bindings")))
}

impl Store for SqliteStore {
    async fn replace_bindings(
        &self,
        batch: Vec<(String, Vec<StoredBinding>)>,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            {
                let mut delete = conn.prepare_cached("DELETE FROM bindings WHERE aor = ?1")?;
                let mut insert = conn.prepare_cached(
                    "INSERT INTO bindings (aor, contact, transport, local_addr, remote_addr, expires_at, call_id, cseq, instance, reg_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?;
                for (aor, bindings) in &batch {
                    delete.execute([aor])?;
                    for b in bindings {
                        insert.execute(params![
                            b.aor,
                            b.contact,
                            b.transport.as_str(),
                            b.local.to_string(),
                            b.remote.to_string(),
                            b.expires_at,
                            b.call_id,
                            b.cseq,
                            b.instance,
                            b.reg_id,
                        ])?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn load_bindings(&self, now: i64) -> Result<Vec<StoredBinding>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT aor, contact, transport, local_addr, remote_addr, expires_at, call_id, cseq, instance, reg_id
                 FROM bindings WHERE expires_at > ?1 ORDER BY aor, contact",
            )?;
            let rows = stmt.query_map([now], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, u32>(7)?,
                    r.get::<_, Option<String>>(8)?,
                    r.get::<_, Option<u32>>(9)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (aor, contact, transport, local, remote, expires_at, call_id, cseq, instance, reg_id) = row?;
                out.push(StoredBinding {
                    aor,
                    contact,
                    transport: Transport::parse(&transport)
                        .ok_or_else(|| StoreError::Corrupt(format!("bad transport {transport:?}")))?,
                    local: parse_addr(local)?,
                    remote: parse_addr(remote)?,
                    expires_at,
                    call_id,
                    cseq,
                    instance,
                    reg_id,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .optional()?;
            Ok(())
        })
        .await
    }

    async fn insert_messages(&self, messages: Vec<NewMessage>) -> Result<Vec<i64>, StoreError> {
        let isolation = if messages.len() == 1 {
            Isolation::OneStatement
        } else {
            Isolation::Savepoint
        };
        let insert_all = move |conn: &Connection| {
            let mut ids = Vec::with_capacity(messages.len());
            for m in &messages {
                ids.push(insert_message(conn, m)?);
            }
            Ok(ids)
        };
        self.submit(isolation, insert_all, |_| {}).await
    }

    async fn record_inbound(
        &self,
        dedupe_keys: Vec<String>,
        messages: Vec<NewMessage>,
        opt_out: Option<(String, String, bool)>,
        on_commit: super::OnCommit,
    ) -> Result<Recorded, StoreError> {
        self.submit(
            Isolation::Savepoint,
            move |conn| {
                let now = messages.first().map_or(0, |m| m.now);
                let mut seen = conn.prepare_cached(
                    "INSERT OR IGNORE INTO seen_webhooks (key, received_at) VALUES (?1, ?2)",
                )?;
                for key in &dedupe_keys {
                    if seen.execute(params![key, now])? == 0 {
                        // Seen before: undo any key recorded above (the savepoint rolls back).
                        return Err(StoreError::Duplicate);
                    }
                }
                let mut ids = Vec::with_capacity(messages.len());
                for m in &messages {
                    ids.push(insert_message(conn, m)?);
                }
                if let Some((remote, sender, opted_out)) = &opt_out {
                    write_opt_out(conn, remote, sender, *opted_out, now)?;
                }
                Ok(Recorded::New(ids))
            },
            move |recorded| {
                if let Recorded::New(ids) = recorded {
                    on_commit(ids);
                }
            },
        )
        .await
        .or_else(|e| match e {
            StoreError::Duplicate => Ok(Recorded::Duplicate),
            e => Err(e),
        })
    }

    async fn update_message(&self, id: i64, update: Update, now: i64) -> Result<(), StoreError> {
        self.run_one(move |conn| {
            apply_update(conn, id, &update, now)?;
            Ok(())
        })
        .await
    }

    async fn advance_status(
        &self,
        callback: StatusCallback,
        status: MessageStatus,
        error: (Option<i64>, Option<String>),
        now: i64,
    ) -> Result<Advance, StoreError> {
        self.run(move |conn| {
            let found = match (callback.id, &callback.to) {
                (Some(id), _) => {
                    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1 AND direction = 'outbound'");
                    conn.prepare_cached(&sql)?.query_row([id], message_from_row).optional()?
                }
                (None, Some(to)) => {
                    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE remote = ?1 AND direction = 'outbound' AND twilio_sid = ?2");
                    conn.prepare_cached(&sql)?.query_row([to, &callback.sid], message_from_row).optional()?
                }
                (None, None) => None,
            };
            let current = match found {
                Some(m) if m.twilio_sid.as_deref() == Some(callback.sid.as_str()) => m,
                // Twilio answered, but our save of its answer has not committed yet.
                Some(m) if m.twilio_sid.is_none() && !m.status.is_final() => return Ok(Advance::NotSaved),
                Some(_) => return Ok(Advance::Refused),
                // Without our id, "not found" may also mean "not saved yet".
                None if callback.id.is_none() && callback.to.is_some() => return Ok(Advance::NotSaved),
                None => return Ok(Advance::Refused),
            };
            if !current.status.can_become(status) {
                return Ok(Advance::Refused);
            }
            let update = Update {
                status: Some(status),
                error: (error.0.is_some() || error.1.is_some()).then_some(error),
                ..Update::default()
            };
            apply_update(conn, current.id, &update, now)?;
            let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1");
            Ok(conn
                .prepare_cached(&sql)?
                .query_row([current.id], message_from_row)
                .optional()?
                .map_or(Advance::Refused, |m| Advance::Moved(Box::new(m))))
        })
        .await
    }

    async fn claim_outbound(
        &self,
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        self.run(move |conn| {
            let sql = format!(
                "UPDATE messages SET next_attempt_at = ?1, attempts = attempts + 1, reconcile = in_doubt,
                     in_doubt = 1, lease = abs(random()) + 1, updated_at = ?2
                 WHERE id IN (SELECT id FROM messages WHERE direction = 'outbound' AND next_attempt_at <= ?2
                              ORDER BY next_attempt_at, id LIMIT ?3)
                 RETURNING {MESSAGE_COLUMNS}"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![now + lease_ms, now, limit], message_from_row)?;
            let mut out = rows.collect::<Result<Vec<_>, _>>()?;
            out.sort_by_key(|m| m.id);
            Ok(out)
        })
        .await
    }

    async fn renew_lease(&self, id: i64, lease: i64, until: i64) -> Result<bool, StoreError> {
        self.run_one(move |conn| {
            let n = conn
                .prepare_cached("UPDATE messages SET next_attempt_at = ?3 WHERE id = ?1 AND lease = ?2 AND next_attempt_at IS NOT NULL")?
                .execute(params![id, lease, until])?;
            Ok(n == 1)
        })
        .await
    }

    async fn adopt_sid(
        &self,
        id: i64,
        sid: String,
        status: MessageStatus,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let taken = conn
                .prepare_cached(
                    "SELECT 1 FROM messages WHERE remote = (SELECT remote FROM messages WHERE id = ?1)
                         AND direction = 'outbound' AND twilio_sid = ?2",
                )?
                .exists(params![id, &sid])?;
            if taken {
                return Ok(false);
            }
            let update = Update {
                status: Some(status),
                twilio_sid: Some(sid),
                next_attempt_at: Some(None),
                in_doubt: Some(false),
                ..Update::default()
            };
            apply_update(conn, id, &update, now)?;
            Ok(true)
        })
        .await
    }

    async fn pending_inbound(
        &self,
        extension: Option<String>,
        trunk: Option<String>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages INDEXED BY messages_inbox
                 WHERE direction = 'inbound' AND next_attempt_at IS NOT NULL
                   AND extension IS ?1 AND trunk IS ?2 AND id > ?4
                 ORDER BY id LIMIT ?3"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows =
                stmt.query_map(params![extension, trunk, limit, after_id], message_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn due_inbound_owners(&self, now: i64) -> Result<Vec<super::OwnerColumns>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT DISTINCT extension, trunk FROM messages
                 WHERE direction = 'inbound' AND next_attempt_at IS NOT NULL AND next_attempt_at <= ?1",
            )?;
            let rows = stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn message(&self, id: i64) -> Result<Option<Message>, StoreError> {
        self.read(move |conn| {
            let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1");
            Ok(conn
                .prepare_cached(&sql)?
                .query_row([id], message_from_row)
                .optional()?)
        })
        .await
    }

    async fn list_messages(&self, f: MessageFilter) -> Result<Vec<Message>, StoreError> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE (?1 IS NULL OR direction = ?1) AND (?2 IS NULL OR extension = ?2)
                   AND (?3 IS NULL OR remote = ?3 OR sender = ?3) AND (?4 IS NULL OR status = ?4)
                   AND (?5 IS NULL OR created_at >= ?5) AND (?6 IS NULL OR created_at < ?6)
                   AND (?7 IS NULL OR id < ?7)
                 ORDER BY id DESC LIMIT ?8"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![
                    f.direction.map(Direction::as_str),
                    f.extension,
                    f.number,
                    f.status.map(MessageStatus::as_str),
                    f.since,
                    f.until,
                    f.before_id,
                    f.limit
                ],
                message_from_row,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn last_inbound_did(
        &self,
        remote: String,
        dids: Vec<String>,
        since: i64,
    ) -> Result<Option<String>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT sender FROM messages WHERE remote = ?1 AND direction = 'inbound' AND created_at >= ?2
                 ORDER BY id DESC LIMIT 50",
            )?;
            let rows = stmt.query_map(params![remote, since], |r| r.get::<_, String>(0))?;
            for did in rows {
                let did = did?;
                if dids.contains(&did) {
                    return Ok(Some(did));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn set_opt_out(
        &self,
        remote: String,
        sender: String,
        opted_out: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            write_opt_out(conn, &remote, &sender, opted_out, now)?;
            Ok(())
        })
        .await
    }

    async fn opt_outs(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare("SELECT remote, sender FROM opt_outs")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn webhook_token(
        &self,
        sms_config: String,
        rotate: bool,
        now: i64,
    ) -> Result<String, StoreError> {
        self.run(move |conn| {
            if !rotate {
                let existing = conn
                    .query_row("SELECT token FROM webhook_tokens WHERE sms_config = ?1", [&sms_config], |r| r.get(0))
                    .optional()?;
                if let Some(token) = existing {
                    return Ok(token);
                }
            }
            let token = new_token();
            conn.execute(
                "INSERT INTO webhook_tokens (sms_config, token, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sms_config) DO UPDATE SET token = excluded.token, created_at = excluded.created_at",
                params![sms_config, token, now],
            )?;
            Ok(token)
        })
        .await
    }

    async fn put_media(
        &self,
        token: String,
        content_type: String,
        data: Vec<u8>,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO media (token, content_type, data, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![token, content_type, data, expires_at])?;
            Ok(())
        })
        .await
    }

    async fn media(
        &self,
        token: String,
        now: i64,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT content_type, data FROM media WHERE token = ?1 AND expires_at > ?2",
                )?
                .query_row(params![token, now], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?)
        })
        .await
    }

    async fn prune(&self, now: i64, seen_before: i64) -> Result<(), StoreError> {
        self.run(move |conn| {
            conn.execute("DELETE FROM media WHERE expires_at <= ?1", [now])?;
            conn.execute(
                "DELETE FROM seen_webhooks WHERE received_at < ?1",
                [seen_before],
            )?;
            Ok(())
        })
        .await
    }

    async fn release_outbound_leases(&self, now: i64) -> Result<(), StoreError> {
        self.run(move |conn| {
            conn.execute(
                "UPDATE messages SET next_attempt_at = ?1 WHERE direction = 'outbound' AND in_doubt = 1 AND next_attempt_at > ?1",
                [now],
            )?;
            Ok(())
        })
        .await
    }

    async fn queue_stats(&self) -> Result<(u64, u64, Option<i64>), StoreError> {
        self.read(move |conn| {
            Ok(conn.query_row(
                "SELECT
                    (SELECT COUNT(*) FROM messages WHERE direction = 'outbound' AND next_attempt_at IS NOT NULL),
                    (SELECT COUNT(*) FROM messages WHERE direction = 'inbound' AND next_attempt_at IS NOT NULL),
                    (SELECT MIN(created_at) FROM messages WHERE direction = 'inbound' AND next_attempt_at IS NOT NULL)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?)
        })
        .await
    }

    async fn pending_count(&self, extension: String) -> Result<u64, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM messages INDEXED BY messages_inbox
                     WHERE direction = 'inbound' AND extension = ?1 AND trunk IS NULL
                       AND next_attempt_at IS NOT NULL",
                )?
                .query_row([extension], |r| r.get(0))?)
        })
        .await
    }

    async fn count_outbound_since(&self, extension: String, since: i64) -> Result<u64, StoreError> {
        self.read(move |conn| {
            Ok(conn.query_row(
                "SELECT COUNT(*) FROM messages WHERE direction = 'outbound' AND kind = 'sms' AND extension = ?1 AND created_at >= ?2",
                params![extension, since],
                |r| r.get(0),
            )?)
        })
        .await
    }
}

fn write_opt_out(
    conn: &Connection,
    remote: &str,
    sender: &str,
    opted_out: bool,
    now: i64,
) -> rusqlite::Result<usize> {
    if opted_out {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO opt_outs (remote, sender, created_at) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![remote, sender, now])
    } else {
        conn.prepare_cached("DELETE FROM opt_outs WHERE remote = ?1 AND sender = ?2")?
            .execute(params![remote, sender])
    }
}

/// 128 random bits, URL-safe: webhook tokens and media tokens.
pub fn new_token() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

fn apply_update(conn: &Connection, id: i64, u: &Update, now: i64) -> rusqlite::Result<usize> {
    let (set_error, code, message) = match &u.error {
        Some((c, m)) => (true, *c, m.clone()),
        None => (false, None, None),
    };
    let (set_next, next) = match u.next_attempt_at {
        Some(n) => (true, n),
        None => (false, None),
    };
    conn.prepare_cached(
        "UPDATE messages SET
            status = COALESCE(?2, status),
            twilio_sid = COALESCE(?3, twilio_sid),
            error_code = CASE WHEN ?4 THEN ?5 ELSE error_code END,
            error_message = CASE WHEN ?4 THEN ?6 ELSE error_message END,
            next_attempt_at = CASE WHEN ?7 THEN ?8 ELSE next_attempt_at END,
            in_doubt = COALESCE(?9, in_doubt),
            meta = COALESCE(?10, meta),
            sender = COALESCE(?11, sender),
            updated_at = ?12
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        u.status.map(MessageStatus::as_str),
        u.twilio_sid,
        set_error,
        code,
        message,
        set_next,
        next,
        u.in_doubt,
        u.meta.as_ref().map(|m| m.to_string()),
        u.sender,
        now,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(aor: &str, contact: &str, expires_at: i64) -> StoredBinding {
        StoredBinding {
            aor: aor.into(),
            contact: contact.into(),
            transport: Transport::Tcp,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: "192.0.2.7:40000".parse().unwrap(),
            expires_at,
            call_id: "c".into(),
            cseq: 3,
            instance: Some("<urn:uuid:1>".into()),
            reg_id: Some(1),
        }
    }

    fn temp_dir() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("smsgw-store-test-{}", smsgw_sip::random_token(12)))
    }

    #[tokio::test]
    async fn bindings_survive_reopen_and_replace_deletes() {
        let dir = temp_dir();
        {
            let store = SqliteStore::open(&dir).await.unwrap();
            store
                .replace_bindings(vec![
                    (
                        "101".into(),
                        vec![binding("101", "sip:a", 2000), binding("101", "sip:b", 500)],
                    ),
                    ("102".into(), vec![binding("102", "sip:c", 2000)]),
                ])
                .await
                .unwrap();
            store
                .replace_bindings(vec![("102".into(), vec![])])
                .await
                .unwrap();
        }
        let store = SqliteStore::open(&dir).await.unwrap();
        let loaded = store.load_bindings(1000).await.unwrap();
        assert_eq!(loaded, vec![binding("101", "sip:a", 2000)]);
        store.ping().await.unwrap();
        let version: usize = Connection::open(dir.join("smsgw.db"))
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn one_contact_with_two_reg_ids_is_two_rows() {
        // RFC 5626: the same Contact over two flows (reg-id 1 and 2) is two bindings.
        let dir = temp_dir();
        let store = SqliteStore::open(&dir).await.unwrap();
        let mut second = binding("101", "sip:a", 2000);
        second.reg_id = Some(2);
        store
            .replace_bindings(vec![(
                "101".into(),
                vec![binding("101", "sip:a", 2000), second],
            )])
            .await
            .unwrap();
        assert_eq!(store.load_bindings(1000).await.unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn outbound(now: i64) -> NewMessage {
        NewMessage::sample(Direction::Outbound, now)
    }

    #[tokio::test]
    async fn the_wal_starts_over_while_writes_go_on() {
        // The background checkpointer copies beside the writer, but only the writer's own
        // checkpoint lets the WAL start over; without it the WAL would grow for as long as writes
        // never pause. Each start over bumps the checkpoint sequence number in the WAL header.
        let dir = temp_dir();
        let store = SqliteStore::open(&dir).await.unwrap();
        let until = std::time::Instant::now() + WRITER_CHECKPOINT_EVERY * 3;
        let mut written = 0;
        while std::time::Instant::now() < until {
            store
                .insert_messages(vec![outbound(1000 + written)])
                .await
                .unwrap();
            written += 1;
        }
        let mut header = [0u8; 16];
        std::io::Read::read_exact(
            &mut std::fs::File::open(dir.join("smsgw.db-wal")).unwrap(),
            &mut header,
        )
        .unwrap();
        let restarts = u32::from_be_bytes(header[12..16].try_into().unwrap());
        assert!(
            restarts >= 1,
            "the WAL never started over in {written} commits"
        );
    }

    #[tokio::test]
    async fn outbox_claim_update_and_forward_only_status() {
        let dir = temp_dir();
        let store = SqliteStore::open(&dir).await.unwrap();
        let ids = store
            .insert_messages(vec![outbound(1000), outbound(1001)])
            .await
            .unwrap();
        assert_eq!(ids.len(), 2);
        // Claimed once: the lease hides them from a second claim.
        let claimed = store.claim_outbound(2000, 60_000, 10).await.unwrap();
        assert_eq!(claimed.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
        assert!(claimed.iter().all(|m| m.in_doubt && m.attempts == 1));
        assert!(store
            .claim_outbound(2001, 60_000, 10)
            .await
            .unwrap()
            .is_empty());
        let update_with_sid = |sid: &str| Update {
            status: Some(MessageStatus::Queued),
            twilio_sid: Some(sid.into()),
            next_attempt_at: Some(None),
            in_doubt: Some(false),
            ..Update::default()
        };
        store
            .update_message(ids[0], update_with_sid("SM1"), 2002)
            .await
            .unwrap();
        let callback = |sid: &str, id, to: Option<&str>| StatusCallback {
            sid: sid.into(),
            id,
            to: to.map(str::to_string),
        };
        let store_ref = &store;
        let advance = move |callback, status, now| async move {
            store_ref
                .advance_status(callback, status, (None, None), now)
                .await
                .unwrap()
        };
        let Advance::Moved(delivered) = advance(
            callback("SM1", Some(ids[0]), None),
            MessageStatus::Delivered,
            2003,
        )
        .await
        else {
            panic!("delivered did not move the message");
        };
        assert_eq!(delivered.status, MessageStatus::Delivered);
        assert!(!delivered.in_doubt && delivered.next_attempt_at.is_none());
        let to = Some(delivered.remote.as_str());
        // A late "sent" never moves it back, found by id or by recipient.
        let late = advance(
            callback("SM1", Some(ids[0]), None),
            MessageStatus::Sent,
            2004,
        );
        assert!(matches!(late.await, Advance::Refused));
        let late = advance(callback("SM1", None, to), MessageStatus::Sent, 2004);
        assert!(matches!(late.await, Advance::Refused));
        // Another message's SID: kept for later while that message has none saved yet.
        let early = advance(
            callback("SM1", Some(ids[1]), None),
            MessageStatus::Sent,
            2005,
        );
        assert!(matches!(early.await, Advance::NotSaved));
        store
            .update_message(ids[1], update_with_sid("SM2"), 2006)
            .await
            .unwrap();
        let wrong = advance(
            callback("SM1", Some(ids[1]), None),
            MessageStatus::Sent,
            2007,
        );
        assert!(matches!(wrong.await, Advance::Refused));
        let sent = advance(callback("SM2", None, to), MessageStatus::Sent, 2008).await;
        assert!(
            matches!(sent, Advance::Moved(m) if m.id == ids[1] && m.status == MessageStatus::Sent)
        );
        assert_eq!(
            store.message(ids[0]).await.unwrap().unwrap().status,
            MessageStatus::Delivered
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn leases_fence_attempts_and_a_sid_is_adopted_once() {
        let dir = temp_dir();
        let store = SqliteStore::open(&dir).await.unwrap();
        let ids = store
            .insert_messages(vec![outbound(1000), outbound(1000)])
            .await
            .unwrap();
        let first = store.claim_outbound(2000, 60_000, 10).await.unwrap();
        let lease = first[0].lease;
        assert_ne!(lease, 0);
        assert!(store.renew_lease(ids[0], lease, 70_000).await.unwrap());
        // The lease ran out and another claim took the message: the old holder may not send.
        let again = store.claim_outbound(80_000, 60_000, 10).await.unwrap();
        assert_eq!(again.len(), 2);
        assert!(
            again.iter().all(|m| m.reconcile),
            "in doubt before: reconcile first"
        );
        assert!(!store.renew_lease(ids[0], lease, 90_000).await.unwrap());
        assert!(store
            .renew_lease(ids[0], again[0].lease, 90_000)
            .await
            .unwrap());
        // Two copies of the same text cannot both adopt one SID found at Twilio.
        assert!(store
            .adopt_sid(ids[0], "SMx".into(), MessageStatus::Queued, 3000)
            .await
            .unwrap());
        assert!(!store
            .adopt_sid(ids[1], "SMx".into(), MessageStatus::Queued, 3000)
            .await
            .unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn inbound_webhooks_are_recorded_once() {
        let dir = temp_dir();
        let store = SqliteStore::open(&dir).await.unwrap();
        let mut m = outbound(1000);
        m.direction = Direction::Inbound;
        let committed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let note =
            |committed: &std::sync::Arc<std::sync::Mutex<Vec<i64>>>| -> super::super::OnCommit {
                let committed = committed.clone();
                Box::new(move |ids: &[i64]| committed.lock().unwrap().extend_from_slice(ids))
            };
        let first = store
            .record_inbound(vec!["SM9".into()], vec![m.clone()], None, note(&committed))
            .await
            .unwrap();
        assert!(matches!(first, Recorded::New(ref ids) if *ids == *committed.lock().unwrap()));
        let again = store
            .record_inbound(vec!["SM9".into()], vec![m.clone()], None, note(&committed))
            .await
            .unwrap();
        assert_eq!(again, Recorded::Duplicate);
        assert_eq!(
            committed.lock().unwrap().len(),
            1,
            "a duplicate hands nothing over"
        );
        // A new sid with an old idempotency token is a duplicate too, and records nothing.
        let token = store
            .record_inbound(
                vec!["SM10".into(), "tok".into()],
                vec![m.clone()],
                None,
                Box::new(|_| {}),
            )
            .await
            .unwrap();
        assert!(matches!(token, Recorded::New(_)));
        let replay = store
            .record_inbound(
                vec!["SM11".into(), "tok".into()],
                vec![m],
                None,
                Box::new(|_| {}),
            )
            .await
            .unwrap();
        assert_eq!(replay, Recorded::Duplicate);
        let all = store
            .list_messages(MessageFilter {
                limit: 10,
                ..MessageFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 2);
        assert!(
            store
                .record_inbound(vec!["SM11".into()], vec![], None, Box::new(|_| {}))
                .await
                .is_ok(),
            "SM11 was rolled back"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn many_concurrent_writers_share_commits() {
        let dir = temp_dir();
        let store = SqliteStore::open(&dir).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..500 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.insert_messages(vec![outbound(i)]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let all = store
            .list_messages(MessageFilter {
                limit: 1000,
                ..MessageFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 500);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_version_2_database_keeps_its_messages_and_dedupe_keys() {
        let dir = temp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        {
            let conn = Connection::open(dir.join("smsgw.db")).unwrap();
            for sql in &MIGRATIONS[..2] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO seen_webhooks (key, received_at) VALUES ('sid:SM1', 1)",
                [],
            )
            .unwrap();
            insert_message(&conn, &outbound(1000)).unwrap();
        }
        let store = SqliteStore::open(&dir).await.unwrap();
        let mut m = outbound(1000);
        m.direction = Direction::Inbound;
        let again = store
            .record_inbound(vec!["sid:SM1".into()], vec![m], None, Box::new(|_| {}))
            .await
            .unwrap();
        assert_eq!(again, Recorded::Duplicate);
        let claimed = store.claim_outbound(1000, 60_000, 10).await.unwrap();
        assert_eq!(
            claimed.len(),
            1,
            "the queued message is still in the outbox"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn refuses_a_database_from_the_future() {
        let dir = temp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        Connection::open(dir.join("smsgw.db"))
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = SqliteStore::open(&dir).await.err().unwrap();
        assert!(
            err.to_string().contains("newer than this smsgw knows"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
