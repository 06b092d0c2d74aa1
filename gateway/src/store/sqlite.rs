//! Embedded SQLite (WAL). One dedicated thread owns the connection, so blocking database work
//! never runs on the async runtime's workers; callers queue jobs on a bounded channel.

use super::{Store, StoreError, StoredBinding};
use rusqlite::{params, Connection, OptionalExtension};
use smsgw_sip::Transport;
use std::path::Path;
use tokio::sync::{mpsc, oneshot};

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
];

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

#[derive(Clone)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/smsgw.db`, migrates it, and starts the database thread.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        let conn = tokio::task::spawn_blocking(move || open_and_migrate(&dir))
            .await
            .map_err(|_| StoreError::Closed)??;
        let (jobs, mut rx) = mpsc::channel::<Job>(4096);
        std::thread::Builder::new()
            .name("smsgw-sqlite".into())
            .spawn(move || {
                let mut conn = conn;
                while let Some(job) = rx.blocking_recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot start the database thread: {e}")))?;
        Ok(Self { jobs })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn open_and_migrate(dir: &Path) -> Result<Connection, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
        path: dir.display().to_string(),
        source,
    })?;
    let path = dir.join("smsgw.db");
    let mut conn = Connection::open(&path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source,
    })?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode is durable against process crashes (kill -9); FULL adds power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    migrate(&mut conn)?;
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
            let tx = conn.transaction()?;
            {
                let mut delete = tx.prepare_cached("DELETE FROM bindings WHERE aor = ?1")?;
                let mut insert = tx.prepare_cached(
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
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn load_bindings(&self, now: i64) -> Result<Vec<StoredBinding>, StoreError> {
        self.run(move |conn| {
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
