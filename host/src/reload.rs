//! Reloading the configuration while serving.
//!
//! A reload is asked for in four ways: a change in the folder of the config file or of a
//! plugin file (watched with `notify`; folders rather than files, because editors save by
//! renaming a new file over the old one and Kubernetes swaps a symlink), `SIGHUP`,
//! `POST /reload` on the admin listener, and a periodic checksum of every file the
//! configuration reads, as a backstop for missed events. Watch events are debounced, and a
//! watch- or checksum-triggered reload runs only when the files' contents differ from the
//! last attempt, so one save is one reload however many events it makes. `SIGHUP` and
//! `POST /reload` reload too, except when the files are exactly as at the last attempt: then
//! they report that attempt's outcome, so asking twice for the same content never makes two
//! generations.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;

/// Quiet time after the last file event before a reload starts.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Longest wait for quiet: files that never stop changing must not hold reloads back.
const MAX_SETTLE: Duration = Duration::from_secs(1);

/// How often every file the configuration reads is checksummed.
const CHECKSUM_INTERVAL: Duration = Duration::from_secs(10);

/// Asks the reloader for a reload and waits for its outcome.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    requests: mpsc::Sender<oneshot::Sender<Result<u64, ConfigError>>>,
}

/// The task that owns reloading: the watcher, the signal and the checksum.
struct Reloader {
    gateway: Arc<Gateway>,
    path: PathBuf,
    /// Checksum of the files at the last reload attempt, successful or not, and its outcome.
    seen: [u8; 32],
    outcome: Result<u64, ConfigError>,
    watcher: Option<RecommendedWatcher>,
    watched: HashSet<PathBuf>,
    /// File names of the config and plugin files, shared with the watcher's callback.
    names: SourceNames,
}

/// The file names of the files the configuration reads. A watched folder may hold other
/// files that change all the time (an access log, say); writes to those are not a reason to
/// reload.
type SourceNames = Arc<Mutex<HashSet<OsString>>>;

impl ReloadHandle {
    /// Reloads now; the new generation, or every problem that kept the old one serving.
    pub async fn reload(&self) -> Result<u64, ConfigError> {
        let stopped = || ConfigError::one("the reloader has stopped");
        let (reply, outcome) = oneshot::channel();
        self.requests.send(reply).await.map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// Starts reloading `gateway` from the config file at `path`. `loaded` is the [`checksum`]
/// of the files the gateway was built from, taken before they were read, so that a change
/// made while the gateway started is not missed.
pub fn spawn(gateway: Arc<Gateway>, path: PathBuf, loaded: [u8; 32]) -> ReloadHandle {
    let (requests, request_rx) = mpsc::channel(8);
    // One pending change is enough: the reload that handles it reads every file anew.
    let (changed, changed_rx) = mpsc::channel(1);
    let mut reloader = Reloader {
        seen: loaded,
        outcome: Ok(gateway.snapshot().generation),
        gateway,
        path,
        watcher: None,
        watched: HashSet::new(),
        names: SourceNames::default(),
    };
    reloader.watcher = watcher(changed, reloader.names.clone());
    reloader.rewatch();
    tokio::spawn(reloader.run(request_rx, changed_rx));
    ReloadHandle { requests }
}

impl Reloader {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<oneshot::Sender<Result<u64, ConfigError>>>,
        mut changed: mpsc::Receiver<()>,
    ) {
        let mut hangup = Hangup::new();
        let mut backstop = tokio::time::interval(CHECKSUM_INTERVAL);
        backstop.tick().await;
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some(reply) => {
                        self.reload_if_changed().await;
                        let _ = reply.send(self.outcome.clone());
                    }
                    None => return,
                },
                Some(()) = changed.recv() => {
                    settle(&mut changed).await;
                    self.reload_if_changed().await;
                }
                () = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    self.reload_if_changed().await;
                }
                _ = backstop.tick() => self.reload_if_changed().await,
            }
        }
    }

    async fn reload_if_changed(&mut self) {
        // Reading and hashing every file takes a while for large plugins: not on a worker
        // that serves requests. A failed hash counts as a change, so the reload says why.
        let path = self.path.clone();
        let current = tokio::task::spawn_blocking(move || checksum(&path))
            .await
            .unwrap_or_default();
        if current != self.seen {
            self.seen = current;
            self.outcome = self.reload().await;
        }
    }

    async fn reload(&mut self) -> Result<u64, ConfigError> {
        let outcome = match Config::load(&self.path) {
            Ok(config) => self.gateway.reload(config).await,
            Err(err) => {
                self.gateway.metrics().config_refused();
                for problem in &err.problems {
                    tracing::warn!("reload refused: {problem}");
                }
                Err(err)
            }
        };
        self.rewatch();
        outcome
    }

    /// Watches the folders of the config file and of every plugin it names.
    fn rewatch(&mut self) {
        let Some(watcher) = &mut self.watcher else {
            return;
        };
        let sources = sources(&self.path);
        let names = sources
            .iter()
            .filter_map(|p| p.file_name())
            .map(OsString::from);
        *lock(&self.names) = names.collect();
        let folders: HashSet<PathBuf> = sources.iter().filter_map(|p| folder(p)).collect();
        for gone in self.watched.difference(&folders) {
            let _ = watcher.unwatch(gone);
        }
        for new in folders.difference(&self.watched) {
            if let Err(err) = watcher.watch(new, RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %new.display(), "cannot watch for changes: {err}");
            }
        }
        self.watched = folders;
    }
}

/// Waits until no file event has arrived for [`DEBOUNCE`], or [`MAX_SETTLE`] at most.
async fn settle(changed: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + MAX_SETTLE;
    let quiet =
        async { while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, changed.recv()).await {} };
    let _ = tokio::time::timeout_at(deadline, quiet).await;
}

fn watcher(changed: mpsc::Sender<()>, names: SourceNames) -> Option<RecommendedWatcher> {
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| matters(&event, &lock(&names))) {
            // NB: a full channel already holds a pending change, which covers this one.
            let _ = changed.try_send(());
        }
    });
    watcher
        .inspect_err(|err| {
            tracing::warn!("cannot watch files, relying on the periodic checksum: {err}")
        })
        .ok()
}

/// Whether a file event may change what the configuration reads: any creation, removal or
/// rename in a watched folder (an editor's save by rename, a Kubernetes symlink swap), and a
/// write to a file named like one of the sources; not reads, nor writes to other files.
fn matters(event: &notify::Event, names: &HashSet<OsString>) -> bool {
    use notify::EventKind;
    use notify::event::ModifyKind;
    match event.kind {
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Name(_)) => true,
        EventKind::Modify(_) => event
            .paths
            .iter()
            .any(|path| path.file_name().is_some_and(|name| names.contains(name))),
        _ => true,
    }
}

fn lock(names: &SourceNames) -> std::sync::MutexGuard<'_, HashSet<OsString>> {
    // NB: the set is only replaced or read whole while locked; nothing panics inside.
    names
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The config file and every plugin file it names (as far as it can be parsed).
fn sources(path: &Path) -> Vec<PathBuf> {
    let mut sources = vec![path.to_path_buf()];
    if let Ok(config) = Config::load(path) {
        sources.extend(config.plugins.into_iter().map(|plugin| plugin.path));
    }
    sources
}

fn folder(path: &Path) -> Option<PathBuf> {
    let parent = path.parent()?;
    Some(if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent.to_path_buf()
    })
}

/// A checksum over the contents of every file the configuration at `path` reads.
pub fn checksum(path: &Path) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for source in sources(path) {
        hasher.update(source.as_os_str().as_encoded_bytes());
        match std::fs::read(&source) {
            Ok(bytes) => {
                hasher.update([1]);
                hasher.update(Sha256::digest(&bytes));
            }
            Err(_) => hasher.update([0]),
        }
    }
    hasher.finalize().into()
}

/// `SIGHUP`, where there is such a thing.
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let signal = signal(SignalKind::hangup())
                .inspect_err(|err| tracing::warn!("cannot listen for SIGHUP: {err}"))
                .ok();
            Hangup { signal }
        }
        #[cfg(not(unix))]
        Hangup {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            signal.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}
