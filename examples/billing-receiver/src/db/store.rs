//! The batch insert: the whole array in one `INSERT ... SELECT FROM unnest(...)` statement.
//! Idempotent on the event id (`ON CONFLICT (id) DO NOTHING`), so redelivery never double-bills.

use chrono::{DateTime, Utc};

use super::{DbError, Pool};
use crate::event::UsageEvent;

const INSERT: &str = "
INSERT INTO function_usage (
    id, namespace, function_name, started, duration_ns, billed_duration_ms, memory_bytes,
    memory_peak_bytes, cpu_ns, status_code, call_id, source, cold_start, init_duration_ns,
    delivery_id)
SELECT u.*, $15::text
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::int8[], $6::int8[],
            $7::int8[], $8::int8[], $9::int8[], $10::int4[], $11::text[], $12::text[],
            $13::bool[], $14::int8[]) AS u
ON CONFLICT (id) DO NOTHING";

/// What one delivery did: rows new to the table, and rows already there (redelivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub inserted: u64,
    pub duplicates: u64,
}

/// Column-wise arrays for `unnest`.
#[derive(Default)]
struct Columns {
    id: Vec<String>,
    namespace: Vec<String>,
    function_name: Vec<String>,
    started: Vec<DateTime<Utc>>,
    duration_ns: Vec<i64>,
    billed_duration_ms: Vec<i64>,
    memory_bytes: Vec<i64>,
    memory_peak_bytes: Vec<Option<i64>>,
    cpu_ns: Vec<Option<i64>>,
    status_code: Vec<Option<i32>>,
    call_id: Vec<Option<String>>,
    source: Vec<String>,
    cold_start: Vec<bool>,
    init_duration_ns: Vec<Option<i64>>,
}

impl Columns {
    fn from_events(events: &[UsageEvent]) -> Self {
        let mut c = Columns::default();
        for e in events {
            c.id.push(e.id.clone());
            c.namespace.push(e.namespace.clone());
            c.function_name.push(e.function_name.clone());
            c.started.push(e.started);
            c.duration_ns.push(e.duration_ns);
            c.billed_duration_ms.push(e.billed_duration_ms);
            c.memory_bytes.push(e.memory_bytes);
            c.memory_peak_bytes.push(e.memory_peak_bytes);
            c.cpu_ns.push(e.cpu_ns);
            c.status_code.push(e.status_code);
            c.call_id.push(e.call_id.clone());
            c.source.push(e.source.clone());
            c.cold_start.push(e.cold_start);
            c.init_duration_ns.push(e.init_duration_ns);
        }
        c
    }
}

/// Inserts the batch in one statement (one implicit transaction); returns after the commit.
///
/// A pooled connection that turns out dead (PostgreSQL restarted since it was opened) is
/// retried once on a fresh connection; if that fails too the database is reported unavailable.
pub async fn insert_batch(
    pool: &Pool,
    events: &[UsageEvent],
    delivery_id: Option<&str>,
) -> Result<Stored, DbError> {
    if events.is_empty() {
        return Ok(Stored {
            inserted: 0,
            duplicates: 0,
        });
    }
    let cols = Columns::from_events(events);
    let mut conn = pool.get().await?;
    let first = execute(conn.client(), &cols, delivery_id).await;
    let inserted = match first {
        Err(e) if conn.reused && e.is_unavailable() => {
            tracing::info!(error = %e, "stale pooled connection; retrying on a fresh one");
            conn.discard();
            let mut fresh = pool.get_fresh().await?;
            execute(fresh.client(), &cols, delivery_id).await?
        }
        other => other?,
    };
    Ok(Stored {
        inserted,
        duplicates: events.len() as u64 - inserted,
    })
}

async fn execute(
    client: &tokio_postgres::Client,
    c: &Columns,
    delivery_id: Option<&str>,
) -> Result<u64, DbError> {
    client
        .execute(
            INSERT,
            &[
                &c.id,
                &c.namespace,
                &c.function_name,
                &c.started,
                &c.duration_ns,
                &c.billed_duration_ms,
                &c.memory_bytes,
                &c.memory_peak_bytes,
                &c.cpu_ns,
                &c.status_code,
                &c.call_id,
                &c.source,
                &c.cold_start,
                &c.init_duration_ns,
                &delivery_id,
            ],
        )
        .await
        .map_err(DbError::from_pg)
}
