//! The worker service: accepts coordinator connections, authenticates each before serving
//! anything, and serves the [`Worker`] protocol on it.
//!
//! Each connection belongs to one run. Its request handlers run as tasks owned by the
//! connection: when the coordinator disconnects (or its socket errors, or it sends a malformed
//! or oversized frame), every handler is aborted, which kills the process groups of its running
//! tests and removes their temporary directories (see [`dtf::sandbox::Sandbox::run`]). What the
//! run holds (pinned blobs, input trees, fork servers) is kept for [`RUN_LINGER`] after its last
//! connection closes when the coordinator named the run with a key (protocol 4): a coordinator
//! that reconnects says the same key and finds it again.
//!
//! Coordinators of protocol 3 are served through [`protocol::v3`]'s translation.
//!
//! Draining ([`Shared::start_drain`]): run requests waiting for a slot and new ones are
//! declined, heartbeats and hellos say so, and running tests go on.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use dtf::inputs::{self, Manifest, Materialized, OutputFile};
use dtf::outcome::{Failure, escape_control};
use dtf::protocol::{
    self, Beat, CHUNK_SIZE, Chunk, Declined, Digest, Download, DrainStarted, Hello, InputsReady,
    MAX_PARTIAL_UPLOADS_PER_CONNECTION, RunKey, RunRequest, RunResponse, RunningTest, Token,
    UploadError, UploadProgress, Worker, WorkerInfo, WorkerStatus,
};
use dtf::registry::Isolation;
use dtf::sandbox::Sandbox;
use dtf::sandbox::paths::PathMap;
use futures::StreamExt;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::admission::{Admission, Admitted, Limits, Ready, Refusal, Source};
use crate::cache::Cache;
use crate::fair::{RunId, SlotPool};
use crate::metrics::{Gauges, Metrics, Outcome};

/// How long a new connection may take to authenticate.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Requests one connection may have in flight (a coordinator keeps slots + 2 runs and a ping).
const MAX_REQUESTS_PER_CONNECTION: usize = 1024;

/// The most digests one `missing` call may ask about (an input tree's files are asked about
/// in batches of this size).
const MAX_DIGESTS: usize = 8192;

/// The longest run label kept.
const MAX_LABEL: usize = 200;

/// How long what a run holds is kept after its last connection broke (not after a `finish`),
/// for a coordinator that reconnects: it tries again 250 ms after losing a worker. Short, since
/// a fork server is a process.
pub const RUN_LINGER: Duration = Duration::from_secs(5);

/// State shared by every connection.
pub struct Shared {
    /// The worker's name.
    pub name: String,
    /// Tests at once.
    pub slots: usize,
    /// The binary cache.
    pub cache: Cache,
    /// Where tests' temporary directories go.
    pub tmp_root: PathBuf,
    /// `None` when each test's process maps the coordinator's paths; else why it cannot.
    pub path_mapping: Option<String>,
    /// Counters for `/metrics` and the status page.
    pub metrics: Metrics,
    /// True once the worker drains (SIGTERM or `drain`): it takes no new tests; `/readyz`
    /// fails.
    draining: AtomicBool,
    /// How long a drain lets running tests go on (`--drain-timeout`).
    pub drain_timeout: Duration,
    drain: watch::Sender<bool>,
    /// Run requests past the draining check and not yet finished.
    active: AtomicUsize,
    pool: Arc<SlotPool>,
    started: Instant,
    tests_run: AtomicU64,
    connections: AtomicU32,
    next_id: AtomicU64,
    running: Mutex<HashMap<u64, Running>>,
    /// Runs that named themselves with a key, by key.
    runs: Mutex<HashMap<RunKey, Arc<RunState>>>,
}

struct Running {
    test: String,
    run: String,
    since: Instant,
}

impl Shared {
    /// The worker's shared state.
    pub fn new(
        name: String,
        slots: usize,
        cache: Cache,
        tmp_root: PathBuf,
        path_mapping: Option<String>,
        drain_timeout: Duration,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            name,
            slots,
            cache,
            tmp_root,
            path_mapping,
            metrics: Metrics::default(),
            draining: AtomicBool::new(false),
            drain_timeout,
            drain: watch::channel(false).0,
            active: AtomicUsize::new(0),
            runs: Mutex::new(HashMap::new()),
            pool: SlotPool::new(slots),
            started: Instant::now(),
            tests_run: AtomicU64::new(0),
            connections: AtomicU32::new(0),
            next_id: AtomicU64::new(1),
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Starts draining: no new tests; those waiting for a slot are declined. False when it was
    /// draining already.
    pub fn start_drain(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::SeqCst);
        self.drain.send_replace(true);
        first
    }

    /// Marks the worker as draining (or not): `/readyz` fails and `dtf_worker_draining` is 1
    /// while it is. Turning it on starts a drain ([`Shared::start_drain`]).
    pub fn set_draining(&self, draining: bool) {
        if draining {
            self.start_drain();
        } else {
            self.draining.store(false, Ordering::SeqCst);
            self.drain.send_replace(false);
        }
    }

    /// True while the worker drains.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// What `dtf-worker status` reports.
    pub fn snapshot(&self) -> WorkerStatus {
        self.status()
    }

    /// The figures `/metrics` reads at scrape time.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            slots: self.slots as u64,
            busy: self.running().len() as u64,
            connections: u64::from(self.connections.load(Ordering::Relaxed)),
            draining: self.is_draining(),
            cache: self.cache.stats(),
        }
    }

    /// Turns true when the worker starts draining.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }

    /// Tests running (or about to start) now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    fn runs(&self) -> MutexGuard<'_, HashMap<RunKey, Arc<RunState>>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self) -> MutexGuard<'_, HashMap<u64, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> WorkerStatus {
        let cache = self.cache.stats();
        let mut running: Vec<RunningTest> = self
            .running()
            .values()
            .map(|r| RunningTest {
                test: r.test.clone(),
                run: r.run.clone(),
                running_ms: r.since.elapsed().as_millis() as u64,
            })
            .collect();
        running.sort_by_key(|r| std::cmp::Reverse(r.running_ms));
        WorkerStatus {
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: protocol::PROTOCOL_VERSION,
            slots: self.slots as u32,
            connections: self.connections.load(Ordering::Relaxed),
            running,
            waiting: self.pool.waiting() as u32,
            tests_run: self.tests_run.load(Ordering::Relaxed),
            cache_entries: cache.entries,
            cache_bytes: cache.bytes,
            cache_max: cache.max,
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            bytes_received: cache.received,
            uptime_secs: self.started.elapsed().as_secs(),
            draining: self.is_draining(),
        }
    }
}

/// One coordinator connection's view of the service.
#[derive(Clone)]
struct Conn {
    shared: Arc<Shared>,
    /// The run this connection belongs to (its own, until a hello names a known run).
    run: Arc<Mutex<Arc<RunState>>>,
    /// The connection asked about, uploaded or ran something: it counts as a run (one that
    /// only asks for `status` is not counted or logged as one).
    is_run: Arc<AtomicBool>,
}

/// What a run holds on this worker, across its connections.
struct RunState {
    id: RunId,
    key: Option<RunKey>,
    /// The coordinator said the run is over: nothing is kept for a reconnect.
    finished: AtomicBool,
    /// Connections of the run open now.
    connections: AtomicUsize,
    state: Mutex<ConnState>,
}

impl RunState {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new(id: RunId, peer: SocketAddr) -> Arc<RunState> {
        Arc::new(RunState {
            id,
            key: None,
            finished: AtomicBool::new(false),
            connections: AtomicUsize::new(1),
            state: Mutex::new(ConnState {
                label: peer.to_string(),
                peer: Some(peer),
                ..ConnState::default()
            }),
        })
    }
}

#[derive(Default)]
struct ConnState {
    label: String,
    /// The coordinator's address (of the run's first connection).
    peer: Option<SocketAddr>,
    pins: HashSet<Digest>,
    uploads: HashMap<Digest, crate::cache::Upload>,
    /// Input trees built for this connection, by manifest digest.
    trees: HashMap<Digest, Arc<Materialized>>,
    /// Where they were built (removed when the connection closes).
    tree_dirs: Vec<PathBuf>,
    /// Output files listed to the coordinator, by digest, for `download`.
    outputs: HashMap<Digest, PathBuf>,
    /// One sandbox per binary this connection runs tests of: its tests share one fork server,
    /// which ends with the connection.
    sandboxes: HashMap<(Digest, Option<Digest>), Sandbox>,
}

/// Removes a finished run request from the count a drain waits for.
struct Active<'a>(&'a Shared);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Conn {
    fn current(&self) -> Arc<RunState> {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The run's id (the fair share's key and the logs' `run`).
    fn id(&self) -> RunId {
        self.current().id
    }

    /// Counts and logs this connection as a run, the first time it asks for work.
    fn as_run(&self) {
        if self.is_run.swap(true, Ordering::SeqCst) {
            return;
        }
        let (label, peer) = {
            let run = self.current();
            let state = run.lock();
            (state.label.clone(), state.peer)
        };
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        info!(run = self.id(), %peer, label = %label, "run started");
    }

    /// Records a finished test in the metrics and the recent results.
    fn finished(&self, test: &str, outcome: Outcome, duration: Duration) {
        let label = self.current().lock().label.clone();
        self.shared
            .metrics
            .test_finished(test, &label, outcome, duration);
    }

    /// Joins the run named `key`: the one already here (from an earlier connection), or this
    /// connection's own, registered under the key.
    fn join(&self, key: RunKey) -> bool {
        let mut runs = self.shared.runs();
        let mut slot = self.run.lock().unwrap_or_else(|e| e.into_inner());
        if slot.key == Some(key) {
            return false;
        }
        if let Some(existing) = runs.get(&key) {
            existing.connections.fetch_add(1, Ordering::SeqCst);
            let own = std::mem::replace(&mut *slot, existing.clone());
            drop(slot);
            drop(runs);
            own.connections.fetch_sub(1, Ordering::SeqCst);
            close_run(&self.shared, &own);
            return true;
        }
        let own = slot.clone();
        let keyed = Arc::new(RunState {
            id: own.id,
            key: Some(key),
            finished: AtomicBool::new(false),
            connections: AtomicUsize::new(1),
            state: Mutex::new(std::mem::take(&mut *own.lock())),
        });
        runs.insert(key, keyed.clone());
        *slot = keyed;
        false
    }

    /// Pins `digest` for this connection once (so it survives until the connection closes).
    fn pin(&self, digest: Digest) -> bool {
        let run = self.current();
        let mut state = run.lock();
        if state.pins.contains(&digest) {
            return true;
        }
        if self.shared.cache.pin(&digest) {
            state.pins.insert(digest);
            true
        } else {
            false
        }
    }

    /// The connection closed: its run releases what it held (pins, partial uploads, input
    /// trees, fork servers) when this was its last connection, at once for a run without a
    /// key, after [`RUN_LINGER`] without a new connection for one with a key.
    fn close(&self) {
        let run = self.current();
        if run.connections.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let key = match run.key {
            Some(key) if !run.finished.load(Ordering::SeqCst) => key,
            _ => {
                if let Some(key) = run.key {
                    let mut runs = self.shared.runs();
                    if runs.get(&key).is_some_and(|r| Arc::ptr_eq(r, &run)) {
                        runs.remove(&key);
                    }
                }
                close_run(&self.shared, &run);
                return;
            }
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RUN_LINGER).await;
            let mut runs = shared.runs();
            if run.connections.load(Ordering::SeqCst) == 0
                && runs.get(&key).is_some_and(|r| Arc::ptr_eq(r, &run))
            {
                runs.remove(&key);
                drop(runs);
                info!(
                    run = run.id,
                    "run forgotten: no connection for {RUN_LINGER:?}"
                );
                close_run(&shared, &run);
            }
        });
    }

    /// Builds the tree of the manifest with `digest` (stored like any blob), once.
    fn prepare_tree(&self, digest: Digest) -> Result<InputsReady, String> {
        let cache = &self.shared.cache;
        if let Some(tree) = self.current().lock().trees.get(&digest) {
            return Ok(ready(tree));
        }
        let path = cache
            .use_binary(&digest)
            .ok_or_else(|| format!("the manifest {} was not uploaded", digest.short()))?;
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read the manifest: {e}"))?;
        let manifest =
            Manifest::decode(&bytes).map_err(|e| format!("refused the manifest: {e}"))?;
        for (blob, _) in manifest.blobs() {
            if !self.pin(blob) {
                return Err(format!(
                    "the manifest names {}, which was not uploaded",
                    blob.short()
                ));
            }
        }
        let dir = self
            .shared
            .tmp_root
            .join(format!("inputs-{}-{}", self.id(), digest.short()));
        self.current().lock().tree_dirs.push(dir.clone());
        let tree = inputs::materialize(&manifest, |d| cache.use_binary(d), &dir)?;
        let tree = Arc::new(tree);
        self.current().lock().trees.insert(digest, tree.clone());
        Ok(ready(&tree))
    }

    fn upload_chunk(&self, chunk: Chunk) -> Result<UploadProgress, UploadError> {
        let cache = &self.shared.cache;
        let run = self.current();
        let mut state = run.lock();
        let mut upload = match state.uploads.remove(&chunk.digest) {
            Some(upload) => upload,
            None if chunk.offset == 0
                && (chunk.data.len() as u64) < chunk.total
                && state.uploads.len() >= MAX_PARTIAL_UPLOADS_PER_CONNECTION =>
            {
                return Err(UploadError::Storage(format!(
                    "{} uploads are in progress on this connection, the limit \
                     ({MAX_PARTIAL_UPLOADS_PER_CONNECTION} per connection); finish one first",
                    state.uploads.len()
                )));
            }
            None if chunk.offset == 0 => cache.begin(chunk.digest, chunk.total)?,
            None => {
                return Err(UploadError::OutOfOrder {
                    expected: 0,
                    got: chunk.offset,
                });
            }
        };
        if !cache.write(&mut upload, &chunk)? {
            state.uploads.insert(chunk.digest, upload);
            return Ok(UploadProgress::Partial(
                chunk.offset + chunk.data.len() as u64,
            ));
        }
        drop(state);
        cache.finish(upload)?;
        let run = self.current();
        let mut state = run.lock();
        // `finish` pinned it once for us.
        if !state.pins.insert(chunk.digest) {
            cache.unpin(&chunk.digest);
        }
        Ok(UploadProgress::Stored)
    }
}

/// Releases what a run held, once no connection has it.
fn close_run(shared: &Shared, run: &RunState) {
    if run.connections.load(Ordering::SeqCst) != 0 {
        return;
    }
    let mut state = run.state.lock().unwrap_or_else(|e| e.into_inner());
    for digest in state.pins.drain() {
        shared.cache.unpin(&digest);
    }
    state.uploads.clear();
    state.trees.clear();
    state.outputs.clear();
    for dir in state.tree_dirs.drain(..) {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!(run = run.id, dir = %dir.display(), "cannot remove an input tree: {e}");
        }
    }
    state.sandboxes.clear();
    shared.pool.forget(run.id);
}

/// Removes a test from the running list when its handler ends or is aborted.
struct RunningGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.shared.running().remove(&self.id);
    }
}

fn ready(tree: &Materialized) -> InputsReady {
    InputsReady {
        files: tree.files.len() as u64,
        bytes: 0,
    }
}

fn system_failure(shared: &Shared, message: String) -> RunResponse {
    RunResponse {
        failure: Some(Failure::System { message }),
        duration: Duration::ZERO,
        output: Default::default(),
        leaked: Vec::new(),
        worker: shared.name.clone(),
    }
}

impl Worker for Conn {
    async fn hello(self, _: Context, hello: Hello) -> WorkerInfo {
        // Control characters are shown escaped (`\n`, `\u{1b}`): the label reaches logs and
        // `dtf-worker status`.
        let label: String = escape_control(&hello.run).chars().take(MAX_LABEL).collect();
        let rejoined = hello.key.is_some_and(|key| self.join(key));
        if rejoined {
            info!(run = self.id(), label = %label, "run reconnected: what it shipped is still here");
        } else {
            tracing::debug!(run = self.id(), label = %label, "hello");
        }
        self.current().lock().label = label;
        WorkerInfo {
            name: self.shared.name.clone(),
            slots: self.shared.slots as u32,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            path_mapping: self.shared.path_mapping.clone(),
            draining: self.shared.is_draining(),
        }
    }

    async fn missing(self, _: Context, digests: Vec<Digest>) -> Vec<Digest> {
        self.as_run();
        let digests = &digests[..digests.len().min(MAX_DIGESTS)];
        let (missing, pinned) = self.shared.cache.check_and_pin(digests);
        let run = self.current();
        let mut state = run.lock();
        for digest in pinned {
            if !state.pins.insert(digest) {
                self.shared.cache.unpin(&digest);
            }
        }
        missing
    }

    async fn upload(self, _: Context, chunk: Chunk) -> Result<UploadProgress, UploadError> {
        self.as_run();
        let digest = chunk.digest;
        let result = tokio::task::block_in_place(|| self.upload_chunk(chunk));
        match &result {
            Ok(UploadProgress::Stored) => {
                info!(run = self.id(), digest = %digest.short(), "binary stored")
            }
            Ok(UploadProgress::Partial(_)) => {}
            Err(e) => warn!(run = self.id(), digest = %digest.short(), "upload refused: {e}"),
        }
        result
    }

    async fn run(self, _: Context, request: RunRequest) -> Result<RunResponse, Declined> {
        let RunRequest {
            digest,
            inputs,
            mut spec,
        } = request;
        self.as_run();
        let shared = &self.shared;
        let tree = match inputs {
            None => None,
            Some(manifest) => match self.current().lock().trees.get(&manifest) {
                Some(tree) => Some(tree.clone()),
                None => {
                    self.finished(&spec.test, Outcome::SystemError, Duration::ZERO);
                    return Ok(system_failure(
                        shared,
                        format!(
                            "the input tree {} was not prepared on worker {}",
                            manifest.short(),
                            shared.name
                        ),
                    ));
                }
            },
        };
        if spec.isolation == Isolation::FullOrEnv {
            spec.isolation = Isolation::Full;
        }
        // Output always comes back in the response, capped as the coordinator asked.
        spec.capture = true;
        let output_cap = match dtf::outcome::take_output_cap(&mut spec.env) {
            Ok(cap) => cap,
            Err(message) => return Ok(system_failure(shared, message)),
        };
        // A draining worker declines what waits for a slot, and anything new.
        if shared.is_draining() {
            return Err(Declined::Draining);
        }
        let Some(path) = shared.cache.use_binary(&digest) else {
            self.finished(&spec.test, Outcome::SystemError, Duration::ZERO);
            return Ok(system_failure(
                shared,
                format!(
                    "the test binary {} is not in worker {}'s cache (it was never uploaded on this connection)",
                    digest.short(),
                    shared.name
                ),
            ));
        };
        self.pin(digest);
        let mut binds = None;
        if let Some(tree) = &tree {
            let remap = shared.path_mapping.is_some();
            tree.rewrite_env(&mut spec.env, remap);
            if remap {
                // No namespaces here: the test starts in the copy of its package root.
                spec.cwd = spec
                    .cwd
                    .as_ref()
                    .and_then(|cwd| cwd.to_str())
                    .and_then(|cwd| tree.local_path(cwd));
            } else {
                binds = Some(tree.binds());
            }
        }
        // One sandbox (and so one fork server) per binary and input tree on this connection,
        // looked up and inserted under one lock: tests that arrive together share it.
        let sandbox = self
            .current()
            .lock()
            .sandboxes
            .entry((digest, inputs))
            .or_insert_with(|| {
                // The loader path as the test gets it (pointing into the shipped copies): the
                // fork server loads the same libraries.
                let loader: Vec<(String, String)> = spec
                    .env
                    .iter()
                    .filter(|(name, _)| name == "LD_LIBRARY_PATH")
                    .cloned()
                    .collect();
                let sandbox =
                    Sandbox::new(path, shared.tmp_root.clone(), false).with_server_env(loader);
                match binds {
                    Some(binds) => sandbox.with_paths(PathMap {
                        binds,
                        cwd: spec.cwd.clone(),
                    }),
                    None => sandbox,
                }
            })
            .clone();
        // While the test waits for a slot, its binary's fork server starts (a few
        // milliseconds), rather than in the slot once it has one.
        sandbox.start_fork_server_for(&spec);
        let mut drain = shared.drain_signal();
        let _permit = tokio::select! {
            permit = shared.pool.acquire(self.id()) => permit,
            _ = drain.wait_for(|d| *d) => return Err(Declined::Draining),
        };
        // Counted before the check, so a drain that starts now either sees this test or this
        // test sees the drain.
        shared.active.fetch_add(1, Ordering::SeqCst);
        let _active = Active(shared);
        if shared.is_draining() {
            return Err(Declined::Draining);
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let label = self.current().lock().label.clone();
        shared.running().insert(
            id,
            Running {
                test: spec.test.clone(),
                run: label,
                since: Instant::now(),
            },
        );
        let _running = RunningGuard { shared, id };
        let attempt = sandbox.with_output_cap(output_cap).run(&spec).await;
        shared.tests_run.fetch_add(1, Ordering::Relaxed);
        let outcome = Outcome::of(attempt.failure.as_ref());
        self.finished(&spec.test, outcome, attempt.duration);
        match &attempt.failure {
            None => {
                info!(run = self.id(), test = %escape_control(&spec.test), ms = attempt.duration.as_millis() as u64, "passed")
            }
            Some(f) => {
                info!(run = self.id(), test = %escape_control(&spec.test), ms = attempt.duration.as_millis() as u64, "failed: {}", escape_control(f.to_string().lines().next().unwrap_or_default()))
            }
        }
        Ok(RunResponse {
            failure: attempt.failure,
            duration: attempt.duration,
            output: attempt.output,
            leaked: attempt.leaked,
            worker: shared.name.clone(),
        })
    }

    async fn prepare_inputs(self, _: Context, manifest: Digest) -> Result<InputsReady, String> {
        self.as_run();
        let result = tokio::task::block_in_place(|| self.prepare_tree(manifest));
        match &result {
            Ok(r) => {
                info!(run = self.id(), manifest = %manifest.short(), files = r.files, "input tree ready")
            }
            Err(e) => {
                warn!(run = self.id(), manifest = %manifest.short(), "input tree refused: {}", e.escape_debug())
            }
        }
        result
    }

    async fn outputs(self, _: Context, manifest: Digest) -> Vec<OutputFile> {
        let Some(tree) = self.current().lock().trees.get(&manifest).cloned() else {
            return Vec::new();
        };
        let found = tokio::task::block_in_place(|| inputs::collect_outputs(&tree));
        let run = self.current();
        let mut state = run.lock();
        found
            .into_iter()
            .map(|(file, local)| {
                state.outputs.insert(file.digest, local);
                file
            })
            .collect()
    }

    async fn download(self, _: Context, digest: Digest, offset: u64) -> Result<Download, String> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(path) = self.current().lock().outputs.get(&digest).cloned() else {
            return Err(format!("{} is not an output of this run", digest.short()));
        };
        tokio::task::block_in_place(|| {
            let mut file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| e.to_string())?;
            let mut data = Vec::with_capacity(CHUNK_SIZE);
            file.take(CHUNK_SIZE as u64)
                .read_to_end(&mut data)
                .map_err(|e| e.to_string())?;
            Ok(Download { data })
        })
    }

    async fn ping(self, _: Context) -> Beat {
        Beat {
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
            draining: self.shared.is_draining(),
        }
    }

    async fn status(self, _: Context) -> WorkerStatus {
        self.shared.status()
    }

    async fn finish(self, _: Context) {
        self.current().finished.store(true, Ordering::SeqCst);
    }

    async fn drain(self, _: Context) -> DrainStarted {
        let started = self.shared.start_drain();
        if started {
            info!(run = self.id(), "drain requested");
        }
        DrainStarted {
            started,
            running: self.shared.active() as u32,
            timeout_secs: self.shared.drain_timeout.as_secs(),
        }
    }
}

/// A stream that reports when its read side ends (EOF or error): the coordinator is gone.
struct Watched {
    inner: TcpStream,
    closed: watch::Sender<bool>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let had_room = buf.remaining() > 0;
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if had_room && buf.filled().len() == before => {
                self.closed.send_replace(true);
            }
            Poll::Ready(Err(_)) => {
                self.closed.send_replace(true);
            }
            _ => {}
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections that have not authenticated yet: the [`Admission`] rules, a way to ask each
/// to leave (eviction), and a bound on their sockets (including those still closing).
pub struct Gate {
    state: Mutex<(Admission, HashMap<u64, oneshot::Sender<()>>)>,
    sockets: Arc<Semaphore>,
}

impl Gate {
    /// A gate with these limits.
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new((Admission::new(limits), HashMap::new())),
            // Room for the caps, and as many again for connections being closed.
            sockets: Arc::new(Semaphore::new(2 * limits.max_total)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, (Admission, HashMap<u64, oneshot::Sender<()>>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `source`: its id and the signal that asks it to leave.
    fn admit(&self, source: Source) -> (u64, oneshot::Receiver<()>) {
        let mut state = self.lock();
        let Admitted { id, evict } = state.0.admit(source, Instant::now());
        for victim in evict {
            if let Some(tx) = state.1.remove(&victim) {
                let _ = tx.send(());
            }
        }
        let (tx, rx) = oneshot::channel();
        state.1.insert(id, tx);
        (id, rx)
    }

    /// Connection `id` was asked to leave but its greeting is there: it stays.
    fn reinstate(&self, id: u64, source: Source) -> oneshot::Receiver<()> {
        let mut state = self.lock();
        state.0.reinstate(id, source, Instant::now());
        let (tx, rx) = oneshot::channel();
        state.1.insert(id, tx);
        rx
    }

    fn ready(&self, id: u64, source: Source) -> Ready {
        self.lock().0.ready(id, source, Instant::now())
    }

    fn done(
        &self,
        id: u64,
        source: Source,
        peer: SocketAddr,
        waited: bool,
        result: Result<(), Refusal>,
    ) {
        let mut state = self.lock();
        state.1.remove(&id);
        let line = state
            .0
            .done(id, source, peer, waited, result, Instant::now());
        drop(state);
        log_refusals(line);
    }

    fn flush(&self) {
        let line = self.lock().0.flush(Instant::now());
        log_refusals(line);
    }
}

fn log_refusals(line: Option<String>) {
    if let Some(line) = line {
        warn!("{line}");
    }
}

/// Accepts connections until `shutdown` turns true, then ends every connection (killing
/// their tests) and returns.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: Option<Token>,
    gate: Arc<Gate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // No accept while the unauthenticated sockets (and those closing) are at their bound:
        // the kernel's accept queue waits instead of this process running out of descriptors.
        let permit = tokio::select! {
            permit = gate.sockets.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = tick.tick() => { gate.flush(); continue; }
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let source = Source::of(peer);
                    let (id, evicted) = gate.admit(source);
                    let pending = PendingConn { id, source, peer, evicted, gate: gate.clone(), permit, waited: false };
                    connections.spawn(handle(stream, pending, shared.clone(), token.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tick.tick() => gate.flush(),
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    info!(
        connections = connections.len(),
        "shutting down: ending every connection"
    );
    connections.shutdown().await;
}

/// A connection that has not authenticated yet.
struct PendingConn {
    id: u64,
    source: Source,
    peer: SocketAddr,
    evicted: oneshot::Receiver<()>,
    gate: Arc<Gate>,
    permit: OwnedSemaphorePermit,
    /// It waited out its source's back-off (and so held the source's one waiting place).
    waited: bool,
}

/// Why a handshake did not complete.
enum Unauthenticated {
    Handshake(protocol::HandshakeError),
    Evicted,
    BackingOff,
    Timeout,
}

/// True when bytes are waiting on `stream` (looked at without reading them).
fn has_data(stream: &TcpStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    matches!(
        recv(
            stream.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Ok(1)
    )
}

/// Waits for the greeting (or eviction), then the back-off, then runs the handshake.
async fn authenticate(
    stream: TcpStream,
    pending: &mut PendingConn,
    token: Option<&Token>,
    closed: watch::Sender<bool>,
) -> Result<protocol::SecureStream<Watched>, Unauthenticated> {
    loop {
        tokio::select! {
            biased;
            ready = stream.readable() => match ready {
                Ok(()) => break,
                Err(e) => return Err(Unauthenticated::Handshake(e.into())),
            },
            _ = &mut pending.evicted => {
                if has_data(&stream) {
                    pending.evicted = pending.gate.reinstate(pending.id, pending.source);
                } else {
                    return Err(Unauthenticated::Evicted);
                }
            }
        }
    }
    match pending.gate.ready(pending.id, pending.source) {
        Ready::Go => {}
        Ready::BackingOff => return Err(Unauthenticated::BackingOff),
        Ready::Wait(delay) => {
            pending.waited = true;
            tokio::time::sleep(delay).await;
        }
    }
    let io = Watched {
        inner: stream,
        closed,
    };
    tokio::select! {
        r = protocol::server_handshake(io, token) => r.map_err(Unauthenticated::Handshake),
        _ = &mut pending.evicted => Err(Unauthenticated::Evicted),
    }
}

async fn handle(
    stream: TcpStream,
    mut pending: PendingConn,
    shared: Arc<Shared>,
    token: Option<Token>,
) {
    protocol::configure_socket(&stream);
    let (closed_tx, closed) = watch::channel(false);
    let outcome = match tokio::time::timeout(
        HANDSHAKE_LIMIT,
        authenticate(stream, &mut pending, token.as_ref(), closed_tx),
    )
    .await
    {
        Ok(done) => done,
        Err(_) => Err(Unauthenticated::Timeout),
    };
    let PendingConn {
        id: gate_id,
        source,
        peer,
        gate,
        permit,
        waited,
        ..
    } = pending;
    let stream = match outcome {
        Ok(stream) => {
            gate.done(gate_id, source, peer, waited, Ok(()));
            drop(permit);
            stream
        }
        Err(why) => {
            let refusal = match why {
                Unauthenticated::Handshake(e) => Refusal {
                    reason: e.reason(),
                    failed_auth: e.is_failed_authentication(),
                    message: e.to_string(),
                },
                Unauthenticated::Evicted => Refusal {
                    reason: "evicted",
                    failed_auth: false,
                    message: "closed to make room: too many unauthenticated connections".into(),
                },
                Unauthenticated::BackingOff => Refusal {
                    reason: "backing off",
                    failed_auth: false,
                    message: "closed: this address is backing off after failed authentication"
                        .into(),
                },
                Unauthenticated::Timeout => Refusal {
                    reason: "timeout",
                    failed_auth: false,
                    message: format!("no handshake within {HANDSHAKE_LIMIT:?}"),
                },
            };
            shared.metrics.handshake_refused(refusal.reason);
            gate.done(gate_id, source, peer, waited, Err(refusal));
            return;
        }
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, run = id, "connection authenticated");
    let conn = Conn {
        shared: shared.clone(),
        run: Arc::new(Mutex::new(RunState::new(id, peer))),
        is_run: Arc::new(AtomicBool::new(false)),
    };
    let version = stream.version();
    if version == protocol::v3::VERSION {
        serve_connection(
            protocol::v3::server_transport(stream),
            &conn,
            closed,
            peer,
            version,
        )
        .await;
    } else {
        serve_connection(
            protocol::server_transport(stream),
            &conn,
            closed,
            peer,
            version,
        )
        .await;
    }
    conn.close();
    if conn.is_run.load(Ordering::SeqCst) {
        shared.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one authenticated connection until it ends, then aborts its handlers.
async fn serve_connection<T>(
    transport: T,
    conn: &Conn,
    mut closed: watch::Receiver<bool>,
    peer: SocketAddr,
    version: u32,
) where
    T: tarpc::Transport<
            tarpc::Response<protocol::WorkerResponse>,
            tarpc::ClientMessage<protocol::WorkerRequest>,
        > + Send
        + 'static,
{
    let id = conn.id();
    if version != protocol::PROTOCOL_VERSION {
        info!(%peer, run = id, version, "the coordinator speaks an older protocol version");
    }
    let channel = BaseChannel::with_defaults(transport);
    let mut requests = Box::pin(
        channel
            .max_concurrent_requests(MAX_REQUESTS_PER_CONNECTION)
            .requests(),
    );
    let mut handlers = JoinSet::new();
    let reason = loop {
        tokio::select! {
            next = requests.next() => match next {
                Some(Ok(request)) => {
                    handlers.spawn(request.execute(conn.clone().serve()));
                }
                Some(Err(e)) => break format!("connection error: {}", error_chain(&e)),
                None => break "the coordinator closed the connection".to_owned(),
            },
            _ = closed.wait_for(|c| *c) => break "the coordinator disconnected".to_owned(),
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
        }
    };
    let cancelled = handlers.len();
    drop(requests);
    // Aborting a run handler drops its sandbox future: the test's process group is killed and
    // its temporary directory removed.
    handlers.shutdown().await;
    let id = conn.id();
    if !conn.is_run.load(Ordering::SeqCst) {
        // `dtf-worker status` and the like: not a run. A broken connection is still logged.
        if reason.starts_with("connection error") {
            warn!(%peer, run = id, "connection ended before it asked for work: {reason}");
        } else {
            tracing::debug!(%peer, run = id, "connection closed: {reason}");
        }
        return;
    }
    if cancelled > 0 {
        warn!(%peer, run = id, cancelled, "run ended: {reason}; its requests in flight were cancelled");
    } else {
        info!(%peer, run = id, "run ended: {reason}");
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
