//! PostgreSQL side: a small reconnecting pool, migrations, the batch insert and the report.
//! Errors say whether the database is unreachable (retry later: 503) or refused the work (500).

pub mod migrate;
pub mod pool;
pub mod report;
pub mod store;

pub use pool::Pool;

/// A database failure, classified for the HTTP layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Could not connect, or the connection dropped: PostgreSQL is down or restarting.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] tokio_postgres::Error),
    /// Connected, but the statement failed.
    #[error("database error: {0}")]
    Query(#[source] tokio_postgres::Error),
    #[error("timed out waiting for the database after {0:?}")]
    Timeout(std::time::Duration),
}

impl DbError {
    /// Classifies a driver error: connection-level failures are `Unavailable`.
    pub fn from_pg(e: tokio_postgres::Error) -> Self {
        if is_connection_error(&e) {
            Self::Unavailable(e)
        } else {
            Self::Query(e)
        }
    }

    /// True when the sender should simply retry later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout(_))
    }
}

/// Connection-level: closed connection, I/O error, or a server shutting down (SQLSTATE 57P*).
fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("57P") || code.starts_with("08");
    }
    // No server error attached: an I/O or protocol failure on the socket.
    true
}
