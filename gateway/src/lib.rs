//! Tally's gateway: the OpenFaaS-compatible REST API in front of a provider that runs
//! functions. `main` parses the configuration and calls [`run`]; tests drive it the same way.

pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod logs;
pub mod metering;
pub mod metrics;
pub mod names;
pub mod provider;
pub mod proxy;
pub mod quantity;
pub mod queue;
pub mod scaling;
pub mod types;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::net::TcpListener;

use crate::auth::Credentials;
use crate::config::{Config, ProviderKind};
use crate::metrics::Metrics;
use crate::provider::Provider;
use crate::provider::local::{LocalOptions, LocalProvider};

/// What every request handler shares: configuration plus the live handles.
pub struct Gateway {
    pub config: Config,
    pub provider: Arc<dyn Provider>,
    pub metrics: Metrics,
    pub credentials: Option<Credentials>,
    pub client: proxy::http::HttpClient,
    /// For URLs users configure (webhooks, callbacks): http or verified https.
    pub outbound: http::outbound::OutboundClient,
    /// Turns true when the gateway starts shutting down (ends log follows, ...).
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Turns true when everything else has stopped (then the embedded NATS stops).
    pub finished: tokio::sync::watch::Sender<bool>,
    /// JetStream, once connected.
    pub queue: OnceLock<Arc<queue::Queue>>,
    pub queue_worker: OnceLock<Arc<queue::worker::QueueWorker>>,
    /// Usage events the node agent sent (bounded).
    pub usage: metering::Recent,
    /// Metering, when a webhook endpoint is configured.
    pub meter: OnceLock<metering::meter::Meter>,
    /// Why async invocations are unavailable, while they are.
    queue_problem: Mutex<String>,
}

impl Gateway {
    /// The queue, if NATS is connected; else a 503 that says why.
    pub fn queue(&self) -> Result<&Arc<queue::Queue>, error::GatewayError> {
        match self.queue.get() {
            Some(q) if q.connected() => Ok(q),
            Some(_) => Err(error::GatewayError::Unavailable(
                "async invocations are unavailable: NATS is unreachable (sync calls still work)"
                    .into(),
            )),
            None => Err(error::GatewayError::Unavailable(format!(
                "async invocations are unavailable: {}",
                self.queue_problem.lock().unwrap_or_else(|p| p.into_inner())
            ))),
        }
    }

    /// With a webhook endpoint: the meter, its flusher and the sweep of held events.
    fn start_metering(self: &Arc<Self>) -> Result<(), StartError> {
        let m = &self.config.metering;
        if m.webhook_endpoint.is_none() {
            return Ok(());
        }
        let spool_dir = match &m.metering_spool_dir {
            Some(dir) => dir.clone(),
            None => metering::spool::default_dir(&self.config.data_dir())
                .map_err(|e| StartError::Config(e.to_string()))?,
        };
        let limits = metering::flush::Limits {
            capacity: m.metering_buffer,
            every: m.metering_flush_events,
            interval: m.metering_flush_interval,
            max_text: m.webhook_batch_bytes,
        };
        let flusher = metering::flush::Flusher::start(
            Arc::downgrade(self),
            limits,
            m.metering_spool.then_some(spool_dir.as_path()),
        )
        .map_err(|e| StartError::Config(e.to_string()))?;
        let meter = metering::meter::Meter::new(m.clone(), flusher).map_err(StartError::Config)?;
        let _ = self.meter.set(meter);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(gw) = weak.upgrade() else { return };
                if let Some(meter) = gw.meter.get() {
                    meter.sweep(&gw);
                }
            }
        });
        Ok(())
    }

    /// Connects to JetStream in the background (sync calls do not wait for it).
    fn start_queue(self: &Arc<Self>) {
        let gw = self.clone();
        tokio::spawn(async move {
            let data_dir = gw.config.data_dir();
            let started = queue::Queue::start(
                gw.config.queue.clone(),
                &data_dir,
                gw.finished.subscribe(),
                std::time::Duration::MAX,
            )
            .await;
            match started {
                Ok(q) => {
                    let q = Arc::new(q);
                    let _ = gw.queue.set(q.clone());
                    if gw.config.queue.queue_worker {
                        let _ = gw
                            .queue_worker
                            .set(queue::worker::QueueWorker::start(&gw, q));
                    }
                    let m = &gw.config.metering;
                    if m.webhook_endpoint.is_some() && m.event_worker {
                        metering::webhook::start(&gw);
                    }
                }
                Err(e) => {
                    tracing::error!("async invocations are unavailable: {e}");
                    *gw.queue_problem.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
                }
            }
        });
    }

    /// Sets `gateway_service_count` from the provider's desired replica counts.
    pub fn refresh_service_counts(&self) {
        self.metrics.service_count.reset();
        for ns in self.provider.namespaces() {
            for f in self.provider.list(&ns).unwrap_or_default() {
                self.metrics
                    .service_count
                    .with_label_values(&[&format!("{}.{}", f.name, f.namespace)])
                    .set(i64::try_from(f.replicas).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Resolves once the flag turns true (or its sender is gone).
pub(crate) async fn until_true(flag: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, before any await.
    let _ = flag.wait_for(|v| *v).await.map(|_| ());
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("provider: {0}")]
    Provider(#[from] provider::ProviderError),
    #[error("creating data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
}

/// Where the admin credentials came from, for the start-up banner.
#[derive(Debug, Clone)]
pub struct CredentialSource {
    pub dir: PathBuf,
    pub generated: bool,
}

/// Loads credentials and starts the provider (restoring deployed functions).
pub async fn build(config: Config) -> Result<(Arc<Gateway>, Option<CredentialSource>), StartError> {
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(|e| StartError::DataDir(data_dir.clone(), e))?;
    let (credentials, source) = if !config.basic_auth {
        (None, None)
    } else if let Some(dir) = &config.secret_mount_path {
        let c = Credentials::load(dir)?;
        (
            Some(c),
            Some(CredentialSource {
                dir: dir.clone(),
                generated: false,
            }),
        )
    } else {
        let dir = data_dir.join("secrets");
        let (c, generated) = Credentials::load_or_generate(&dir)?;
        (Some(c), Some(CredentialSource { dir, generated }))
    };
    http::outbound::load_roots(config.tls_ca_file.as_deref())
        .map_err(|e| StartError::Config(e.to_string()))?;
    let outbound = http::outbound::client(std::time::Duration::from_secs(30))
        .map_err(|e| StartError::Config(e.to_string()))?;
    let provider: Arc<dyn Provider> = match config.provider {
        ProviderKind::Local => Arc::new(
            LocalProvider::start(LocalOptions {
                data_dir: data_dir.clone(),
                cgroup_parent: config.cgroup_parent.clone(),
                function_user: config.function_user.clone(),
                namespaces: config.all_namespaces(),
                startup_timeout: config.startup_timeout,
                drain_timeout: config.write_timeout,
            })
            .await?,
        ),
    };
    let gw = Arc::new(Gateway {
        config,
        provider,
        metrics: Metrics::new(),
        credentials,
        client: proxy::http::client(),
        outbound,
        stopping: tokio::sync::watch::channel(false).0,
        finished: tokio::sync::watch::channel(false).0,
        queue: OnceLock::new(),
        queue_worker: OnceLock::new(),
        usage: metering::Recent::default(),
        meter: OnceLock::new(),
        queue_problem: Mutex::new("connecting to NATS".into()),
    });
    gw.start_metering()?;
    scaling::autoscaler::start(&gw);
    gw.start_queue();
    Ok((gw, source))
}

/// Serves until `shutdown` resolves, then drains connections and stops the replicas.
pub async fn run(gw: Arc<Gateway>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    http::server::serve(gw, listener, shutdown).await;
}
