//! A tiny connection pool: idle clients are reused, dead ones dropped, new ones made on demand.
//! It survives PostgreSQL restarts because every checkout skips closed clients and reconnects.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Config, NoTls};

use super::DbError;

/// How long a request waits for a connection (free slot plus connect) before giving up.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    idle: Mutex<Vec<Client>>,
    slots: Arc<Semaphore>,
}

/// A checked-out client; returned to the pool on drop unless marked broken.
pub struct Conn {
    client: Option<Client>,
    pool: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
    /// Whether the client came from the idle list (it may be stale after a restart).
    pub reused: bool,
}

impl Pool {
    /// Parses the URL; no connection is made until the first checkout.
    pub fn new(database_url: &str, max_size: usize) -> Result<Self, tokio_postgres::Error> {
        let mut config: Config = database_url.parse()?;
        config.connect_timeout(Duration::from_secs(3));
        if config.get_application_name().is_none() {
            config.application_name("billing-receiver");
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                idle: Mutex::new(Vec::new()),
                slots: Arc::new(Semaphore::new(max_size.max(1))),
            }),
        })
    }

    /// Returns a live client, reusing an idle one when possible.
    pub async fn get(&self) -> Result<Conn, DbError> {
        tokio::time::timeout(CHECKOUT_TIMEOUT, self.checkout())
            .await
            .map_err(|_| DbError::Timeout(CHECKOUT_TIMEOUT))?
    }

    /// Like `get`, but never reuses an idle client (used to retry after a stale one failed).
    pub async fn get_fresh(&self) -> Result<Conn, DbError> {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.get().await
    }

    async fn checkout(&self) -> Result<Conn, DbError> {
        let permit = Arc::clone(&self.inner.slots)
            .acquire_owned()
            .await
            .expect("pool semaphore is never closed");
        let reused = {
            let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let (client, reused) = match reused {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        Ok(Conn {
            client: Some(client),
            pool: Arc::clone(&self.inner),
            _permit: permit,
            reused,
        })
    }

    async fn connect(&self) -> Result<Client, DbError> {
        let (client, connection) = self
            .inner
            .config
            .connect(NoTls)
            .await
            .map_err(DbError::Unavailable)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        Ok(client)
    }
}

impl Conn {
    pub fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("client present until drop")
    }

    /// Drops the client instead of returning it to the pool.
    pub fn discard(mut self) {
        self.client = None;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && !client.is_closed()
        {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(client);
        }
    }
}
