//! The durable store, behind a narrow trait so a PostgreSQL implementation can follow.
//!
//! Today it holds registrations; outbox, inbox, history and opt-outs join it with the messaging
//! pipelines.

mod sqlite;

pub use sqlite::SqliteStore;

use smsgw_sip::Transport;
use std::future::Future;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database migration {version} failed: {source}")]
    Migration {
        version: usize,
        source: rusqlite::Error,
    },
    #[error(
        "the database is version {found}, newer than this smsgw knows ({known}); upgrade smsgw"
    )]
    TooNew { found: usize, known: usize },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("a stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("the store has shut down")]
    Closed,
}

/// One registration as stored. Times are Unix seconds so they survive a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBinding {
    pub aor: String,
    pub contact: String,
    pub transport: Transport,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub expires_at: i64,
    pub call_id: String,
    pub cseq: u32,
    pub instance: Option<String>,
    pub reg_id: Option<u32>,
}

pub trait Store: Send + Sync + 'static {
    /// Replaces the stored bindings of each listed address-of-record (an empty list deletes
    /// them), all in one transaction.
    fn replace_bindings(
        &self,
        batch: Vec<(String, Vec<StoredBinding>)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every stored binding that has not expired at `now` (Unix seconds).
    fn load_bindings(
        &self,
        now: i64,
    ) -> impl Future<Output = Result<Vec<StoredBinding>, StoreError>> + Send;

    /// A cheap round trip, for readiness.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
