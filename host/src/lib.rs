//! Sluice: a programmable edge and API gateway whose policies are sandboxed WebAssembly
//! components.
//!
//! The modules follow a request: [`proxy`] accepts it, matches a route and forwards it; the
//! route's policies run in the [`plugin`] runtime; [`gateway`] holds the configuration
//! snapshot each request uses; [`admin`], [`metrics`] and [`access_log`] show what is
//! happening; [`config`] reads the TOML file everything is built from.

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod config;
pub mod gateway;
pub mod llm;
pub mod metrics;
pub mod plugin;
pub mod proxy;
pub mod reload;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use access_log::AccessLog;
pub use config::{Config, ConfigError};
pub use gateway::Gateway;
pub use metrics::Metrics;
pub use reload::ReloadHandle;

/// A gateway bound to its listeners, ready to serve.
#[derive(Debug)]
pub struct Server {
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    front: proxy::Front,
    config: Config,
    reload: Option<ReloadHandle>,
}

impl Server {
    /// Builds the gateway from `config` and binds its listeners.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let gateway = Gateway::new(&config, Metrics::new()).await?;
        let listener = bind(config.listener.address, "listener").await?;
        let admin = bind(config.admin.address, "admin listener").await?;
        let access_log = AccessLog::start(&config.access_log, gateway.metrics()).await?;
        let tls = config
            .listener
            .tls
            .as_ref()
            .map(proxy::tls::acceptor)
            .transpose()?;
        Ok(Server {
            gateway,
            listener,
            admin,
            front: proxy::Front { access_log, tls },
            config,
            reload: None,
        })
    }

    /// Builds the gateway from the config file at `path` and binds its listeners; the
    /// configuration is then reloaded when the file or a plugin file changes, on `SIGHUP` and
    /// on `POST /reload` (see [`reload`]).
    pub async fn bind_file(path: &Path) -> anyhow::Result<Server> {
        let loaded = reload::checksum(path);
        let mut server = Server::bind(Config::load(path)?).await?;
        server.reload = Some(reload::spawn(
            server.gateway.clone(),
            path.to_path_buf(),
            loaded,
        ));
        Ok(server)
    }

    /// The address the public listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.config.listener.address)
    }

    /// The address the admin listener is bound to.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin.address)
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tracing::info!(listener = %self.local_addr(), admin = %self.admin_addr(), "sluice is serving");
        let admin = tokio::spawn(admin::serve(self.admin, self.gateway.clone(), self.reload));
        let listener = &self.config.listener;
        let limits = proxy::ConnectionLimits {
            max_connections: listener.max_connections,
            header_read_timeout: listener.header_read_timeout_ms,
            max_header_bytes: listener.max_header_bytes,
        };
        let grace = listener.shutdown_grace_ms;
        proxy::serve(
            self.listener,
            self.gateway,
            self.front,
            limits,
            shutdown,
            grace,
        )
        .await;
        admin.abort();
    }
}

async fn bind(address: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|err| anyhow::anyhow!("cannot bind the {what} to {address}: {err}"))
}
