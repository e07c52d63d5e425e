//! Schema migrations: the SQL files in `migrations/`, applied in order at start.
//! Each applied version is recorded in `schema_migrations`, so a re-run is a no-op.

use super::{DbError, Pool};

/// One migration file, embedded at compile time.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first. Add new files at the end; never edit an applied one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "function_usage",
        sql: include_str!("../../migrations/0001_function_usage.sql"),
    },
    Migration {
        version: 2,
        name: "usage_report",
        sql: include_str!("../../migrations/0002_usage_report.sql"),
    },
];

/// Arbitrary key for the advisory lock that serialises concurrent receivers starting up.
const LOCK_KEY: i64 = 0x7a11_b111;

/// Applies pending migrations; returns the versions applied by this call.
pub async fn run(pool: &Pool) -> Result<Vec<i32>, DbError> {
    let mut conn = pool.get().await?;
    let client = conn.client();
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(DbError::from_pg)?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let tx = client.transaction().await.map_err(DbError::from_pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(DbError::from_pg)?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&m.version],
            )
            .await
            .map_err(DbError::from_pg)?
            .is_some();
        if done {
            continue;
        }
        tx.batch_execute(m.sql).await.map_err(DbError::from_pg)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(DbError::from_pg)?;
        tx.commit().await.map_err(DbError::from_pg)?;
        tracing::info!(version = m.version, name = m.name, "migration applied");
        applied.push(m.version);
    }
    Ok(applied)
}
