//! The coordinator: runs a plan on `dtf-worker` services (`DTF_WORKERS` / `--workers`).
//!
//! It connects to every worker in parallel, ships the test binary to those that lack it, and
//! then pulls tests from one shared [`Scheduler`] queue into free worker slots, keeping
//! `slots + LOOKAHEAD` requests in flight per worker so a worker never idles for a round trip
//! between tests. Results are reported as they arrive, through the same reporters as a local
//! run.
//!
//! Failures:
//! - a worker unreachable at start is named in a warning and tried again with back-off
//!   ([`backoff`]) for the whole run; when it answers it is used like the others;
//! - a worker that dies or hangs is noticed by its heartbeat (a ping every second with a short
//!   deadline; two misses and it is lost) or by its connection failing; its tests in flight
//!   are requeued (the scheduler fails a test whose worker was lost [`MAX_WORKER_LOSSES`]
//!   times), and it is tried again like an unreachable one. Every connection of the run says
//!   the same [`RunKey`], so a worker that lived finds what it holds for the run;
//! - a draining worker (SIGTERM, `dtf-worker drain`) says so in its heartbeat and declines what
//!   was queued there; it is sent nothing more, its running tests finish there, and the
//!   declined ones run elsewhere without counting as attempts;
//! - with no worker left, the run waits up to `DTF_WORKER_WAIT` (60 s) for one to come back,
//!   then runs the rest locally, or with `DTF_REQUIRE_WORKERS=1` fails without running any test
//!   here;
//! - `dns:` and `file:` entries of `DTF_WORKERS` are looked up again every
//!   `DTF_WORKERS_REFRESH` (10 s): new workers join, vanished ones take nothing new and leave
//!   when their tests are done;
//! - an infrastructure failure on a worker (`Failure::System`) is retried elsewhere, bounded
//!   by the scheduler; a test's own failure never is (beyond its `retries`).
//!
//! [`MAX_WORKER_LOSSES`]: crate::scheduler::MAX_WORKER_LOSSES

pub mod local;
pub mod room;
pub mod workers;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tarpc::client::RpcError;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::errors::Error;
use crate::inputs::{self, Tree};
use crate::outcome::{Attempt, Failure, OUTPUT_CAP_VAR, Status, Stream, TestReport};
use crate::plan::Plan;
use crate::protocol::{self, RunRequest, Token, WorkerClient, human_bytes};
use crate::report::Reporters;
use crate::runner::{self, Ending, LocalOptions, Signals};
use crate::sandbox::{RunSpec, Sandbox};
use crate::scheduler::{Job, Scheduler};

pub use workers::WorkersSpec;

/// Requests queued on a worker beyond its slots, so it starts the next test at once.
pub const LOOKAHEAD: usize = 2;

/// How often each worker is pinged.
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a ping may take.
const PING_LIMIT: Duration = Duration::from_secs(2);

/// Consecutive missed pings that make a worker lost.
const PING_MISSES: u32 = 2;

/// Deadline of a run request beyond the test's own timeout: time it may wait for a slot on a
/// worker shared with other runs.
const QUEUE_ALLOWANCE: Duration = Duration::from_secs(3600);

/// Deadline of a run request for a test without a timeout.
const NO_TIMEOUT_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The variable that makes a run fail instead of running locally when no worker is reachable.
pub const REQUIRE_VAR: &str = "DTF_REQUIRE_WORKERS";

/// The variable that says how long a run with no worker left waits for one to come back.
pub const WAIT_VAR: &str = "DTF_WORKER_WAIT";

/// How long a run with no worker left waits for one, unless `DTF_WORKER_WAIT` says.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// The variable that says how often `dns:` and `file:` entries are looked up again.
pub const REFRESH_VAR: &str = "DTF_WORKERS_REFRESH";

/// The first retry of an unreachable or lost worker comes after this long; each further one
/// waits twice as long, up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(250);

/// The longest wait between two tries of an unreachable worker.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long to wait before try number `failures + 1` of an unreachable worker: doubling from
/// [`BACKOFF_FIRST`] up to [`BACKOFF_MAX`], then scaled by `0.75 + jitter / 2` (`jitter` in
/// `0..1`) so that coordinators waiting for the same worker do not all call at once.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let doubled = BACKOFF_FIRST.saturating_mul(1u32 << failures.min(16));
    let capped = doubled.min(BACKOFF_MAX);
    capped.mul_f64(0.75 + jitter.clamp(0.0, 1.0) / 2.0)
}

/// Reads a duration variable: seconds (`30`, `0`) or a duration (`500ms`, `2m`).
fn duration_var(name: &str, default: Duration) -> Result<Duration, Error> {
    match std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => {
            let v = v.trim();
            if let Ok(secs) = v.parse::<u64>() {
                return Ok(Duration::from_secs(secs));
            }
            crate::cli::parse_duration(v).map_err(|e| {
                Error::Workers(format!(
                    "invalid {name}=`{v}`: {e} (seconds, such as 60, or a duration, such as 500ms or 2m)"
                ))
            })
        }
    }
}

/// Settings of a distributed run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where to run.
    pub workers: WorkersSpec,
    /// Fail when no worker is reachable instead of running locally.
    pub require: bool,
    /// The run's `--test-threads`: slots of the local fallback and of each `local:N` worker
    /// (divided among them). With 1, tests run one at a time across all workers.
    pub slots: usize,
    /// Stop at the first failure.
    pub fail_fast: bool,
    /// Notice threshold for slow tests.
    pub slow: Duration,
    /// What travels with the binaries as their input trees, one entry per tree: each names
    /// the plan's binaries whose tests see it. A binary that no entry names (or an empty
    /// list) travels alone: its tests see the worker's filesystem as it is.
    pub inputs: Vec<Inputs>,
    /// How long a run with no worker left waits for one (`DTF_WORKER_WAIT`).
    pub wait: Duration,
    /// How often `dns:` and `file:` entries are looked up again (`DTF_WORKERS_REFRESH`).
    pub refresh: Duration,
    /// A run started before its binaries were confirmed to be the ones to run (`cargo dtf`
    /// does that while cargo checks the build): until the gate opens, nothing runs on this
    /// machine (no local fallback) and no output comes back; the run's reports are held by
    /// the same gate ([`Reporters::hold`]).
    pub confirmation: Option<crate::report::Gate>,
}

/// One input tree's sources, the binaries whose tests see it, and the paths compiled into
/// them (named when a worker cannot map them).
#[derive(Clone, Debug)]
pub struct Inputs {
    /// Where the tree comes from.
    pub sources: inputs::Sources,
    /// `(what, path)` of paths compiled into the binaries (`CARGO_MANIFEST_DIR`, `OUT_DIR`, ...).
    pub compiled: Vec<(String, PathBuf)>,
    /// The binaries (indexes into the plan's sandboxes) whose tests run in this tree: the
    /// binaries of one package share their package's tree.
    pub binaries: Vec<usize>,
}

impl Options {
    /// Reads `--workers` (else `DTF_WORKERS`) and `DTF_REQUIRE_WORKERS`. `None` when neither
    /// names workers: the run is local.
    pub fn from_env(
        flag: Option<&str>,
        slots: usize,
        fail_fast: bool,
        slow: Duration,
    ) -> Result<Option<Options>, Error> {
        let (value, source) = match flag {
            Some(v) => (v.to_owned(), "--workers"),
            None => match std::env::var("DTF_WORKERS")
                .ok()
                .filter(|v| !v.trim().is_empty())
            {
                Some(v) => (v, "DTF_WORKERS"),
                None => return Ok(None),
            },
        };
        let workers = WorkersSpec::parse(&value, source).map_err(Error::Workers)?;
        let require = std::env::var(REQUIRE_VAR).is_ok_and(|v| !v.is_empty() && v != "0");
        let wait = duration_var(WAIT_VAR, DEFAULT_WAIT)?;
        let refresh =
            duration_var(REFRESH_VAR, workers::DEFAULT_REFRESH)?.max(Duration::from_millis(100));
        Ok(Some(Options {
            workers,
            require,
            slots,
            fail_fast,
            slow,
            inputs: Vec::new(),
            wait,
            refresh,
            confirmation: None,
        }))
    }
}

/// What a distributed run produced.
pub struct Outcome {
    /// Reports of every test that ran or was stopped.
    pub reports: Vec<TestReport>,
    /// How it ended.
    pub ending: Ending,
    /// Lines for the summary: workers used, bytes shipped, workers lost, local fallback.
    pub notes: Vec<String>,
    /// Why the run failed whatever its tests did (every worker lost, none came back within
    /// `DTF_WORKER_WAIT`, and `DTF_REQUIRE_WORKERS=1`): the tests that finished are in
    /// `reports`, the others are reported as not run, and the run exits 101.
    pub failure: Option<String>,
}

/// Runs `plan` on the workers `options` names, falling back to `sandboxes` (local runs) when
/// none is reachable or all are lost for longer than `DTF_WORKER_WAIT`. `sandboxes[i]` is
/// binary `i` of the plan: each is shipped once to each worker that lacks it.
pub async fn run(
    plan: &Plan,
    order: Vec<usize>,
    sandboxes: &[Sandbox],
    options: &Options,
    reporters: &mut Reporters,
) -> Result<Outcome, Error> {
    let Some(first) = sandboxes.first() else {
        return Err(Error::Workers("no test binary to run".to_owned()));
    };
    let binary_path = first.program().to_path_buf();
    let (endpoints, token, local_workers, discovery) = match &options.workers {
        WorkersSpec::Remote(entries) => {
            let token = Token::from_env().map_err(|e| Error::Workers(e.to_string()))?;
            let (endpoints, problems) = workers::resolve(entries, workers::CONNECT_LIMIT).await;
            for problem in problems {
                warn(&escape(&problem));
            }
            let dynamic: Vec<workers::Entry> = entries.clone();
            let discovery = entries
                .iter()
                .any(workers::Entry::is_dynamic)
                .then_some(dynamic);
            (endpoints, token, None, discovery)
        }
        WorkersSpec::Local(n) => {
            let each = (options.slots / n).max(1);
            let started = local::start(&binary_path, *n, each)
                .await
                .map_err(Error::Workers)?;
            let token = Token::new(&started.token, "the local workers' token")
                .map_err(|e| Error::Workers(e.to_string()))?;
            let endpoints = started
                .endpoints()
                .into_iter()
                .map(|(addr, name)| workers::Endpoint {
                    key: addr.clone(),
                    addr,
                    label: name,
                })
                .collect();
            (endpoints, Some(token), Some(started), None)
        }
    };

    let outcome = run_on(
        plan, order, sandboxes, options, reporters, endpoints, token, discovery,
    )
    .await;
    if let Some(workers) = local_workers {
        workers.stop().await;
    }
    outcome
}

/// What every connection of the run needs: the binaries, the input trees, the token, the run's
/// label and key.
struct Shipment {
    binaries: Vec<workers::Binary>,
    /// Every input tree of the run, each once (binaries of one package share theirs).
    trees: Vec<Arc<Tree>>,
    token: Option<Token>,
    run_label: String,
    key: protocol::RunKey,
}

impl Shipment {
    async fn prepare(
        &self,
        endpoint: &workers::Endpoint,
    ) -> Result<workers::Ready, workers::Unusable> {
        workers::prepare(
            &endpoint.addr,
            &endpoint.label,
            self.token.as_ref(),
            &self.run_label,
            Some(self.key),
            &self.binaries,
            &self.trees,
        )
        .await
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_on(
    plan: &Plan,
    order: Vec<usize>,
    sandboxes: &[Sandbox],
    options: &Options,
    reporters: &mut Reporters,
    endpoints: Vec<workers::Endpoint>,
    token: Option<Token>,
    discovery: Option<Vec<workers::Entry>>,
) -> Result<Outcome, Error> {
    // Only the binaries that have tests in the plan travel.
    let used: HashSet<usize> = plan.tests.iter().map(|t| t.binary).collect();
    let mut wanted: Vec<usize> = used.into_iter().filter(|&i| i < sandboxes.len()).collect();
    wanted.sort_unstable();
    if wanted.is_empty() && !sandboxes.is_empty() {
        wanted.push(0);
    }
    let paths: Vec<std::path::PathBuf> = wanted
        .iter()
        .map(|&i| sandboxes[i].program().to_path_buf())
        .collect();
    let binaries = tokio::task::spawn_blocking(move || workers::Binary::read_all(&paths))
        .await
        .map_err(|e| Error::Workers(format!("cannot read the test binaries: {e}")))?
        .map_err(Error::Workers)?;
    // By the plan's binary index; a binary without tests is never asked for.
    let mut digests: Vec<protocol::Digest> = vec![protocol::Digest::of(&[]); sandboxes.len()];
    for (&i, binary) in wanted.iter().zip(&binaries) {
        digests[i] = binary.digest;
    }
    let run_label = run_label(
        &std::env::current_exe().unwrap_or_else(|_| sandboxes[0].program().to_path_buf()),
    );

    // The input trees: computed before anything is shipped, so a tree over its cap fails the
    // run before any test starts. Only the trees of binaries with tests in the plan.
    let (trees, tree_of) = compute_trees(&options.inputs, &wanted, sandboxes.len()).await?;
    let key = protocol::RunKey::random()
        .map_err(|e| Error::Workers(format!("cannot make the run's key: {e}")))?;
    let shipment = Arc::new(Shipment {
        binaries,
        trees: trees.clone(),
        token,
        run_label,
        key,
    });

    let connecting = endpoints.iter().map(|endpoint| {
        let shipment = &shipment;
        async move { shipment.prepare(endpoint).await }
    });
    let results = futures::future::join_all(connecting).await;
    let mut ready = Vec::new();
    let mut retry = Vec::new();
    let mut unreachable = Vec::new();
    for (endpoint, result) in endpoints.iter().zip(results) {
        let addr = &endpoint.label;
        match result {
            Ok(r) => ready.push((endpoint.clone(), r)),
            Err(workers::Unusable::Unreachable(message)) => {
                warn(&format!(
                    "worker {addr} is unreachable, going on without it for now (it is tried again during the run): {}",
                    escape(&message)
                ));
                unreachable.push(addr.clone());
                retry.push(endpoint.clone());
            }
            Err(workers::Unusable::Failed(message)) => {
                warn(&format!(
                    "cannot use worker {addr}, going on without it: {}",
                    escape(&message)
                ));
                unreachable.push(addr.clone());
            }
        }
    }

    let mut notes = Vec::new();
    let may_come = !retry.is_empty() || discovery.is_some();
    if ready.is_empty() && (!may_come || options.wait.is_zero()) {
        // Tests run here only once they are known to be the ones to run.
        if let Some(gate) = &options.confirmation {
            if !gate.decided().await {
                return Err(Error::Workers(SUPERSEDED.to_owned()));
            }
        }
        let names = endpoints
            .iter()
            .map(|e| e.label.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if options.require {
            return Err(Error::Workers(format!(
                "no worker is reachable ({names}) and {REQUIRE_VAR}=1 forbids running the tests locally"
            )));
        }
        let message = format!("no worker is reachable ({names}); running the tests locally");
        notice(&message);
        notes.push(format!("dtf: {message}"));
        let local = LocalOptions {
            slots: options.slots,
            share_short: false,
            fail_fast: options.fail_fast,
            slow: options.slow,
        };
        let (reports, ending) =
            runner::run_local(plan, order, &[], sandboxes, &local, reporters).await;
        return Ok(Outcome {
            reports,
            ending,
            notes,
            failure: None,
        });
    }

    let shipped_to = ready.iter().filter(|(_, r)| r.shipped > 0).count();
    let shipped: u64 = ready.iter().map(|(_, r)| r.shipped).sum();
    let mut line = format!(
        "dtf: {} worker{}; {} shipped to {shipped_to} of {} ({shipped} bytes{}), already cached on {}",
        ready.len(),
        if ready.len() == 1 { "" } else { "s" },
        if shipment.binaries.len() == 1 {
            "binary".to_owned()
        } else {
            format!("{} binaries", shipment.binaries.len())
        },
        ready.len(),
        if shipped >= 1024 {
            format!(" = {}", human_bytes(shipped))
        } else {
            String::new()
        },
        ready.len() - shipped_to
    );
    if !unreachable.is_empty() {
        line.push_str(&format!("; left out: {}", unreachable.join(", ")));
    }
    notes.push(line);
    let ready_only: Vec<&workers::Ready> = ready.iter().map(|(_, r)| r).collect();
    if !trees.is_empty() {
        notes.push(inputs_line(&trees, &ready_only));
        if let Some(note) = unmapped_note(&ready_only, options) {
            notice(&note);
            notes.push(format!("dtf: {note}"));
        }
    }

    let mut dispatcher = Dispatcher::new(
        plan, order, sandboxes, options, digests, tree_of, shipment, ready, retry,
    );
    if let Some(entries) = discovery {
        dispatcher.discover(entries);
    }
    let ending = dispatcher.run(reporters).await;
    // Outputs come back into the checkout only from a run known to be the one to run.
    if let Some(gate) = &options.confirmation {
        if !gate.decided().await {
            dispatcher.finish().await;
            return Err(Error::Workers(SUPERSEDED.to_owned()));
        }
    }
    if dispatcher.fatal.is_none() {
        if let Some(line) = dispatcher.fetch_outputs(&trees).await {
            notes.push(line);
        }
    }
    dispatcher.finish().await;
    notes.extend(dispatcher.notes());
    Ok(Outcome {
        reports: dispatcher.reports,
        ending,
        notes,
        failure: dispatcher.fatal,
    })
}

/// The input trees of `inputs` whose binaries are among `wanted`, each once (two entries
/// that come to the same tree share it), and for each binary index below `binaries` the
/// index of its tree.
async fn compute_trees(
    inputs: &[Inputs],
    wanted: &[usize],
    binaries: usize,
) -> Result<(Vec<Arc<Tree>>, Vec<Option<usize>>), Error> {
    let used: Vec<Inputs> = inputs
        .iter()
        .filter(|i| i.binaries.iter().any(|b| wanted.contains(b)))
        .cloned()
        .collect();
    let computed = tokio::task::spawn_blocking(move || {
        used.into_iter()
            .map(|i| Tree::compute(&i.sources).map(|tree| (i.binaries, tree)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| Error::Workers(format!("cannot compute the input trees: {e}")))??;
    let mut trees: Vec<Arc<Tree>> = Vec::new();
    let mut tree_of = vec![None; binaries];
    for (of, tree) in computed {
        let at = match trees.iter().position(|t| t.digest == tree.digest) {
            Some(at) => at,
            None => {
                for note in &tree.notes {
                    notice(&escape(note));
                }
                trees.push(Arc::new(tree));
                trees.len() - 1
            }
        };
        for b in of {
            if let Some(slot) = tree_of.get_mut(b) {
                slot.get_or_insert(at);
            }
        }
    }
    Ok((trees, tree_of))
}

/// `dtf: inputs: 3 files shipped to 1 of 2 (120 bytes), already cached on 1; 40 files (1.2 MiB)
/// in the tree` (`in 2 trees` when the run's binaries come from several packages).
fn inputs_line(trees: &[Arc<Tree>], ready: &[&workers::Ready]) -> String {
    let shipped_to = ready.iter().filter(|r| r.input_bytes > 0).count();
    let files: u64 = ready.iter().map(|r| r.input_files).sum();
    let bytes: u64 = ready.iter().map(|r| r.input_bytes).sum();
    let (tree_files, tree_bytes) = trees.iter().fold((0, 0), |(f, b), t| {
        let (tf, tb) = t.size();
        (f + tf, b + tb)
    });
    format!(
        "dtf: inputs: {files} file{} shipped to {shipped_to} of {} ({bytes} bytes{}), already cached on {}; {tree_files} file{} ({}) in {}",
        if files == 1 { "" } else { "s" },
        ready.len(),
        if bytes >= 1024 {
            format!(" = {}", human_bytes(bytes))
        } else {
            String::new()
        },
        ready.len() - shipped_to,
        if tree_files == 1 { "" } else { "s" },
        human_bytes(tree_bytes),
        match trees.len() {
            1 => "the tree".to_owned(),
            n => format!("{n} trees"),
        },
    )
}

/// One note for the workers that cannot map paths: which compiled-in paths will not resolve
/// there.
fn unmapped_note(ready: &[&workers::Ready], options: &Options) -> Option<String> {
    let refusing: Vec<String> = ready
        .iter()
        .filter_map(|r| {
            r.path_mapping
                .as_ref()
                .map(|why| format!("{} ({})", r.label, escape(why)))
        })
        .collect();
    if refusing.is_empty() {
        return None;
    }
    let mut compiled: Vec<String> = Vec::new();
    for (what, path) in options.inputs.iter().flat_map(|i| &i.compiled) {
        let shown = format!("{} = {}", what, path.display());
        if !compiled.contains(&shown) {
            compiled.push(shown);
        }
    }
    let compiled = compiled.join(", ");
    Some(format!(
        "note: {} cannot map this machine's paths for tests: {}. There, tests start in a copy of the \
         package root, and CARGO_MANIFEST_DIR, the loader path and other variables holding shipped \
         paths point into the copy; paths compiled into the binary (env!) will not resolve: {compiled}",
        if refusing.len() == 1 {
            "worker"
        } else {
            "workers"
        },
        refusing.join("; ")
    ))
}

/// Text from a peer or the filesystem, safe to print.
fn escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// `fixture (pid 42, alice@host)`: how workers show this run in their status and logs.
fn run_label(binary: &Path) -> String {
    let name = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let uid = nix::unistd::getuid();
    let user = (std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .or_else(|| Some(nix::unistd::User::from_uid(uid).ok()??.name))
        .unwrap_or_else(|| uid.to_string());
    format!("{name} (pid {}, {user}@{host})", std::process::id())
}

/// Why a held run ended without its reports: its binaries were not the ones to run.
pub const SUPERSEDED: &str =
    "the run was started before cargo confirmed its test binaries, and they were not current";

fn warn(message: &str) {
    eprintln!("dtf: warning: {message}");
}

fn notice(message: &str) {
    eprintln!("dtf: {message}");
}

/// Where an attempt runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    Remote(usize),
    Local,
}

impl Target {
    /// Its position in the run's [`room::Loads`]: the local slots first, then each worker.
    fn index(self) -> usize {
        match self {
            Target::Local => 0,
            Target::Remote(i) => i + 1,
        }
    }
}

/// What the tasks tell the dispatch loop.
enum Event {
    /// A run request ended: the attempt, or the worker declined it, or the call failed.
    Done {
        target: Target,
        id: u64,
        result: Result<Result<Attempt, protocol::Declined>, RpcError>,
    },
    /// A ping of connection `generation` of a worker ended.
    Ping {
        worker: usize,
        generation: u64,
        beat: Option<protocol::Beat>,
    },
    /// A connection attempt ended.
    Connected {
        worker: usize,
        result: Result<workers::Ready, workers::Unusable>,
    },
    /// A look-up of the `dns:` and `file:` entries ended (`partial`: some of it failed).
    Discovered {
        endpoints: Vec<workers::Endpoint>,
        partial: bool,
    },
}

/// A worker the run knows, connected or not.
struct Remote {
    endpoint: workers::Endpoint,
    label: String,
    /// The connection, while there is one.
    client: Option<WorkerClient>,
    /// Counts connections, so a heartbeat of an old one is ignored.
    generation: u64,
    slots: usize,
    /// Whether it maps this machine's paths (else tests see copies elsewhere).
    maps_paths: bool,
    /// It said it is draining: it is sent nothing more.
    draining: bool,
    /// It is in the set of workers `DTF_WORKERS` names (false: it vanished from a look-up).
    wanted: bool,
    /// A connection attempt is under way.
    connecting: bool,
    /// Failed connection attempts in a row.
    failures: u32,
    /// When to try connecting again.
    next_try: Instant,
    /// Why it is not tried again (it refused what the run needs).
    given_up: Option<String>,
    /// It was warned about in the current run of failures.
    warned: bool,
    missed: u32,
    ping: Option<AbortHandle>,
    ran: usize,
    shipped: u64,
    setup: Duration,
    connections: usize,
    /// The binaries (by plan index) it has been sent tests of: it has their fork servers up.
    binaries: HashSet<usize>,
}

impl Remote {
    fn new(endpoint: workers::Endpoint) -> Remote {
        Remote {
            label: endpoint.label.clone(),
            endpoint,
            client: None,
            generation: 0,
            slots: 1,
            maps_paths: true,
            draining: false,
            wanted: true,
            connecting: false,
            failures: 0,
            next_try: Instant::now(),
            given_up: None,
            warned: false,
            missed: 0,
            ping: None,
            ran: 0,
            shipped: 0,
            binaries: HashSet::new(),
            setup: Duration::ZERO,
            connections: 0,
        }
    }

    fn alive(&self) -> bool {
        self.client.is_some()
    }

    /// Connected and taking tests.
    fn usable(&self) -> bool {
        self.client.is_some() && !self.draining && self.wanted
    }
}

struct InFlight {
    job: Job,
    target: Target,
    /// Slots it takes there.
    threads: usize,
    abort: AbortHandle,
}

struct Dispatcher<'a> {
    plan: &'a Plan,
    sandboxes: &'a [Sandbox],
    options: &'a Options,
    digests: Vec<protocol::Digest>,
    shipment: Arc<Shipment>,
    /// By the plan's binary index: which of the shipment's trees its tests see.
    tree_of: Vec<Option<usize>>,
    scheduler: Scheduler,
    remotes: Vec<Remote>,
    in_flight: HashMap<u64, InFlight>,
    /// Slots taken on each target by the requests in `in_flight`.
    loads: room::Loads,
    next_id: u64,
    started: HashSet<usize>,
    running_since: HashMap<usize, (Instant, bool)>,
    /// Workers that failed a test with an infrastructure failure: tried last for it.
    avoid: HashMap<usize, HashSet<usize>>,
    local_mode: bool,
    ran_locally: usize,
    lost: Vec<(String, String)>,
    /// Since when no worker takes tests (while the run waits for one).
    no_worker_since: Option<Instant>,
    /// Why the run failed (no worker came back and `DTF_REQUIRE_WORKERS=1`).
    fatal: Option<String>,
    /// The tests reported as not run because of `fatal`.
    not_run: Vec<usize>,
    discovery: Option<AbortHandle>,
    reports: Vec<TestReport>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
}

impl<'a> Dispatcher<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        plan: &'a Plan,
        order: Vec<usize>,
        sandboxes: &'a [Sandbox],
        options: &'a Options,
        digests: Vec<protocol::Digest>,
        tree_of: Vec<Option<usize>>,
        shipment: Arc<Shipment>,
        ready: Vec<(workers::Endpoint, workers::Ready)>,
        retry: Vec<workers::Endpoint>,
    ) -> Dispatcher<'a> {
        let retries: Vec<u32> = plan.tests.iter().map(|t| t.retries).collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut dispatcher = Dispatcher {
            plan,
            sandboxes,
            options,
            digests,
            shipment,
            tree_of,
            scheduler: Scheduler::with_limits(order, &retries, plan.limits()),
            remotes: Vec::new(),
            in_flight: HashMap::new(),
            loads: room::Loads::default(),
            next_id: 1,
            started: HashSet::new(),
            running_since: HashMap::new(),
            avoid: HashMap::new(),
            local_mode: false,
            ran_locally: 0,
            lost: Vec::new(),
            no_worker_since: None,
            fatal: None,
            not_run: Vec::new(),
            discovery: None,
            reports: Vec::new(),
            tx,
            rx,
        };
        for (endpoint, ready) in ready {
            dispatcher.remotes.push(Remote::new(endpoint));
            let i = dispatcher.remotes.len() - 1;
            dispatcher.attach(i, ready, false);
        }
        for endpoint in retry {
            let mut remote = Remote::new(endpoint);
            remote.warned = true; // warned about at the start
            remote.failures = 1;
            remote.next_try = Instant::now() + backoff(0, dispatcher.jitter(0));
            dispatcher.remotes.push(remote);
        }
        dispatcher
    }

    /// Looks up `entries` again every `refresh`, for the length of the run.
    fn discover(&mut self, entries: Vec<workers::Entry>) {
        let tx = self.tx.clone();
        let every = self.options.refresh;
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first look-up was the run's start
            let mut last_problems: Vec<String> = Vec::new();
            loop {
                tick.tick().await;
                let (endpoints, problems) =
                    workers::resolve(&entries, workers::CONNECT_LIMIT).await;
                if problems != last_problems {
                    for problem in &problems {
                        warn(&escape(problem));
                    }
                }
                let partial = !problems.is_empty();
                last_problems = problems;
                if tx.send(Event::Discovered { endpoints, partial }).is_err() {
                    return;
                }
            }
        });
        self.discovery = Some(handle.abort_handle());
    }

    /// A number in `0..1` for the back-off of worker `i`, different for each run and worker.
    fn jitter(&self, i: usize) -> f64 {
        let k = self.shipment.key.0;
        let seed = u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]])
            ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ u64::from(self.remotes.get(i).map_or(0, |r| r.failures))
                .wrapping_mul(0xd6e8_feb8_6659_fd93);
        let mixed = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        mixed as f64 / (1u64 << 53) as f64
    }

    /// Starts using the connection `ready` to worker `i`.
    fn attach(&mut self, i: usize, ready: workers::Ready, announce: bool) {
        let generation = {
            let remote = &mut self.remotes[i];
            remote.generation += 1;
            remote.connections += 1;
            remote.slots = ready.slots;
            remote.maps_paths = ready.path_mapping.is_none();
            remote.shipped += ready.shipped;
            remote.setup += ready.setup;
            remote.draining = false;
            remote.failures = 0;
            remote.warned = false;
            remote.missed = 0;
            remote.client = Some(ready.client.clone());
            remote.generation
        };
        if announce {
            let remote = &self.remotes[i];
            if remote.connections > 1 {
                notice(&format!("worker {} is back; using it again", remote.label));
            } else {
                notice(&format!("worker {} joined the run", remote.label));
            }
        }
        let handle = tokio::spawn(heartbeat(i, generation, ready.client, self.tx.clone()));
        self.remotes[i].ping = Some(handle.abort_handle());
        self.no_worker_since = None;
    }

    /// Ends the connection to worker `i` (which has nothing in flight), without retrying it.
    fn detach(&mut self, i: usize) {
        let remote = &mut self.remotes[i];
        remote.client = None;
        if let Some(ping) = remote.ping.take() {
            ping.abort();
        }
    }

    async fn run(&mut self, reporters: &mut Reporters) -> Ending {
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        let mut signals = Signals::new();
        let mut ending = Ending::Completed;
        loop {
            self.no_worker_left(reporters);
            if self.fatal.is_some() {
                break;
            }
            self.fill(reporters);
            self.retire();
            if self.scheduler.is_done() && self.in_flight.is_empty() {
                break;
            }
            tokio::select! {
                event = self.rx.recv() => {
                    // The dispatcher holds a sender, so the channel never closes.
                    let Some(event) = event else { break };
                    self.handle(event, reporters);
                }
                _ = ticker.tick() => {
                    self.slow_notices(reporters);
                    self.reconnect();
                }
                signal = signals.recv() => {
                    ending = Ending::Interrupted(signal);
                    self.stop(reporters);
                    break;
                }
            }
        }
        for remote in &mut self.remotes {
            if let Some(ping) = remote.ping.take() {
                ping.abort();
            }
        }
        if let Some(discovery) = self.discovery.take() {
            discovery.abort();
        }
        ending
    }

    /// Starts a connection attempt to each worker that is due one.
    fn reconnect(&mut self) {
        if self.scheduler.is_done() {
            return;
        }
        let now = Instant::now();
        for i in 0..self.remotes.len() {
            let remote = &mut self.remotes[i];
            if remote.alive()
                || remote.connecting
                || !remote.wanted
                || remote.given_up.is_some()
                || now < remote.next_try
            {
                continue;
            }
            remote.connecting = true;
            let endpoint = remote.endpoint.clone();
            let shipment = self.shipment.clone();
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let result = shipment.prepare(&endpoint).await;
                let _ = tx.send(Event::Connected { worker: i, result });
            });
        }
    }

    /// Workers that vanished from the discovered set leave once their tests are done.
    fn retire(&mut self) {
        for i in 0..self.remotes.len() {
            if self.remotes[i].alive()
                && !self.remotes[i].wanted
                && self.load(Target::Remote(i)) == 0
            {
                notice(&format!(
                    "worker {} is no longer listed; it leaves the run",
                    self.remotes[i].label
                ));
                self.detach(i);
            }
        }
    }

    /// With no worker taking tests, waits up to `DTF_WORKER_WAIT` for one; then runs the rest
    /// here, or with `DTF_REQUIRE_WORKERS=1` fails the run.
    fn no_worker_left(&mut self, reporters: &mut Reporters) {
        if self.local_mode || self.scheduler.is_done() {
            self.no_worker_since = None;
            return;
        }
        if self.remotes.iter().any(Remote::usable) {
            self.no_worker_since = None;
            return;
        }
        let may_return = self.discovery.is_some()
            || self
                .remotes
                .iter()
                .any(|r| r.given_up.is_none() && r.wanted);
        let wait = if may_return {
            self.options.wait
        } else {
            Duration::ZERO
        };
        let since = match self.no_worker_since {
            Some(since) => since,
            None => {
                if !wait.is_zero() {
                    notice(&format!(
                        "no worker is taking tests; waiting up to {} ({WAIT_VAR}) for one to come back",
                        crate::outcome::format_duration(wait)
                    ));
                }
                *self.no_worker_since.insert(Instant::now())
            }
        };
        if since.elapsed() < wait {
            return;
        }
        let names = self
            .remotes
            .iter()
            .map(|r| r.label.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let within = if wait.is_zero() {
            String::new()
        } else {
            format!(
                " and none came back within {} ({WAIT_VAR})",
                crate::outcome::format_duration(wait)
            )
        };
        // Tests run here only once they are known to be the ones to run.
        if self
            .options
            .confirmation
            .as_ref()
            .is_some_and(|gate| gate.state() != Some(true))
        {
            return;
        }
        if self.options.require {
            let message = format!(
                "every worker is lost ({names}){within}, and {REQUIRE_VAR}=1 forbids running the tests locally"
            );
            eprintln!(
                "dtf: error: {message}; the tests that did not finish are reported as not run"
            );
            self.fatal = Some(message);
            self.not_run = self.stop(reporters);
            return;
        }
        self.local_mode = true;
        notice(&format!(
            "every worker is lost{within}; running the remaining tests locally"
        ));
    }

    /// Starts attempts while some target has room.
    fn fill(&mut self, reporters: &mut Reporters) {
        debug_assert_eq!(
            self.loads.total(),
            self.in_flight.values().map(|f| f.threads).sum::<usize>(),
            "the loads follow the requests in flight"
        );
        loop {
            if self.options.slots == 1 && !self.in_flight.is_empty() {
                return; // one test at a time, as --test-threads=1 asks
            }
            // The emptiest target with room takes the first test that fits in it.
            let Some(any) = self.target_for(None) else {
                return;
            };
            let load = self.load(any);
            let free = if load == 0 {
                usize::MAX
            } else {
                self.capacity(any) - load
            };
            // A worker starts a fork server per binary (a few milliseconds each): among the
            // next tests in line, one of a binary it already runs goes first, then one of a
            // binary no worker runs yet, so binaries spread over workers instead of every
            // worker starting every binary. The window keeps the start order close to the
            // queue's (longest first, by history).
            let job = match any {
                Target::Remote(i) => {
                    let window = 2 * self.targets().map(|t| self.capacity(t)).sum::<usize>();
                    let (remotes, tests) = (&self.remotes, &self.plan.tests);
                    self.scheduler.next_job_preferring(free, window, |test| {
                        let binary = tests[test].binary;
                        if remotes[i].binaries.contains(&binary) {
                            0
                        } else if remotes.iter().all(|r| !r.binaries.contains(&binary)) {
                            1
                        } else {
                            2
                        }
                    })
                }
                Target::Local => self.scheduler.next_job_within(free),
            };
            let Some(job) = job else {
                return;
            };
            // Unless another target fits it and has not failed it already.
            let threads = self.scheduler.threads_of(job.test);
            let target = if self.avoid.contains_key(&job.test) {
                self.target_for(Some(job.test))
                    .filter(|&t| {
                        let load = self.load(t);
                        load == 0 || load + threads <= self.capacity(t)
                    })
                    .unwrap_or(any)
            } else {
                any
            };
            self.dispatch(job, target, reporters);
        }
    }

    fn capacity(&self, target: Target) -> usize {
        match target {
            Target::Remote(i) => {
                if self.remotes[i].usable() {
                    self.remotes[i].slots + LOOKAHEAD
                } else {
                    0
                }
            }
            Target::Local => {
                if self.local_mode {
                    self.options.slots
                } else {
                    0
                }
            }
        }
    }

    /// Slots taken on `target` by the requests in flight there.
    fn load(&self, target: Target) -> usize {
        self.loads.get(target.index())
    }

    /// Records request `id` as in flight.
    fn add_flight(&mut self, id: u64, flight: InFlight) {
        self.loads.add(flight.target.index(), flight.threads);
        self.in_flight.insert(id, flight);
    }

    /// Takes request `id` out of the requests in flight.
    fn take_flight(&mut self, id: u64) -> Option<InFlight> {
        let flight = self.in_flight.remove(&id)?;
        self.loads.remove(flight.target.index(), flight.threads);
        Some(flight)
    }

    fn targets(&self) -> impl Iterator<Item = Target> + '_ {
        (0..self.remotes.len())
            .map(Target::Remote)
            .chain(std::iter::once(Target::Local))
    }

    /// The target with the most free room relative to its size, preferring workers that have
    /// not failed this test with an infrastructure failure.
    fn target_for(&self, test: Option<usize>) -> Option<Target> {
        let avoid = test.and_then(|test| self.avoid.get(&test));
        let rooms = self.targets().map(|t| room::Room {
            load: self.load(t),
            capacity: self.capacity(t),
            avoided: match t {
                Target::Remote(i) => avoid.is_some_and(|a| a.contains(&i)),
                Target::Local => false,
            },
        });
        let i = room::emptiest(rooms)?;
        Some(if i == self.remotes.len() {
            Target::Local
        } else {
            Target::Remote(i)
        })
    }

    fn dispatch(&mut self, job: Job, target: Target, reporters: &mut Reporters) {
        let test = &self.plan.tests[job.test];
        if self.started.insert(job.test) {
            reporters.test_started(&test.name);
        }
        self.running_since
            .entry(job.test)
            .or_insert((Instant::now(), false));
        let id = self.next_id;
        self.next_id += 1;
        let tx = self.tx.clone();
        let handle = match target {
            Target::Remote(i) => {
                let Some(client) = self.remotes[i].client.clone() else {
                    // Not reached: a target without a connection has no capacity.
                    self.scheduler.declined(job);
                    return;
                };
                self.remotes[i].binaries.insert(test.binary);
                let request = RunRequest {
                    digest: self.digests[test.binary],
                    inputs: self.tree_of(test.binary).map(|t| t.digest),
                    spec: remote_spec(&test.spec),
                };
                let ctx = run_context(test.spec.timeout);
                tokio::spawn(async move {
                    let result = client.run(ctx, request).await.map(|r| {
                        r.map(|r| {
                            let worker = r.worker.clone();
                            r.into_attempt(worker)
                        })
                    });
                    let _ = tx.send(Event::Done { target, id, result });
                })
            }
            Target::Local => {
                let sandbox = self.sandboxes[test.binary].clone();
                let spec = test.spec.clone();
                tokio::spawn(async move {
                    let attempt = sandbox.run(&spec).await;
                    let _ = tx.send(Event::Done {
                        target,
                        id,
                        result: Ok(Ok(attempt)),
                    });
                })
            }
        };
        let threads = self.scheduler.threads_of(job.test);
        self.add_flight(
            id,
            InFlight {
                job,
                target,
                threads,
                abort: handle.abort_handle(),
            },
        );
    }

    /// Worker `i` said it is draining: it is sent nothing more.
    fn draining(&mut self, i: usize) {
        let remote = &mut self.remotes[i];
        if remote.draining {
            return;
        }
        remote.draining = true;
        let running = self
            .in_flight
            .values()
            .filter(|f| f.target == Target::Remote(i))
            .count();
        notice(&format!(
            "worker {} is draining: it is sent nothing more; its running tests finish there ({running} in flight; what was queued there comes back)",
            remote.label
        ));
    }

    fn handle(&mut self, event: Event, reporters: &mut Reporters) {
        match event {
            Event::Ping {
                worker,
                generation,
                beat,
            } => {
                let remote = &mut self.remotes[worker];
                if !remote.alive() || remote.generation != generation {
                    return;
                }
                match beat {
                    Some(beat) => {
                        remote.missed = 0;
                        if beat.draining {
                            self.draining(worker);
                        }
                    }
                    None => {
                        remote.missed += 1;
                        if remote.missed >= PING_MISSES {
                            let reason = format!(
                                "it missed {PING_MISSES} heartbeats in a row ({PING_LIMIT:?} deadline each)"
                            );
                            self.lose(worker, reason, reporters);
                        }
                    }
                }
            }
            Event::Connected { worker, result } => {
                let remote = &mut self.remotes[worker];
                remote.connecting = false;
                match result {
                    Ok(ready) if remote.wanted && !self.scheduler.is_done() => {
                        self.attach(worker, ready, true);
                    }
                    Ok(_) => {}
                    Err(workers::Unusable::Unreachable(message)) => {
                        let delay = backoff(remote.failures, self.jitter(worker));
                        let remote = &mut self.remotes[worker];
                        remote.failures += 1;
                        remote.next_try = Instant::now() + delay;
                        if !remote.warned {
                            remote.warned = true;
                            warn(&format!(
                                "worker {} is unreachable; trying again in the background: {}",
                                remote.label,
                                escape(&message)
                            ));
                        }
                    }
                    Err(workers::Unusable::Failed(message)) => {
                        warn(&format!(
                            "cannot use worker {}, going on without it: {}",
                            remote.label,
                            escape(&message)
                        ));
                        remote.given_up = Some(message);
                    }
                }
            }
            Event::Discovered { endpoints, partial } => {
                let known: Vec<(String, bool)> = self
                    .remotes
                    .iter()
                    .map(|r| (r.endpoint.key.clone(), r.wanted))
                    .collect();
                let changes = workers::changes(&known, &endpoints, partial);
                for endpoint in changes.joined {
                    self.remotes.push(Remote::new(endpoint));
                }
                for key in changes.returned {
                    if let Some(r) = self.remotes.iter_mut().find(|r| r.endpoint.key == key) {
                        r.wanted = true;
                        r.next_try = Instant::now();
                    }
                }
                for key in changes.left {
                    if let Some(r) = self.remotes.iter_mut().find(|r| r.endpoint.key == key) {
                        r.wanted = false;
                    }
                }
            }
            Event::Done { target, id, result } => {
                // A request of a worker already declared lost was requeued: ignore its answer.
                let Some(flight) = self.take_flight(id) else {
                    return;
                };
                let job = flight.job;
                let mut attempt = match result {
                    Ok(Ok(attempt)) => attempt,
                    Ok(Err(protocol::Declined::Draining)) => {
                        if let Target::Remote(i) = target {
                            self.draining(i);
                        }
                        self.running_since.remove(&job.test);
                        self.scheduler.declined(job);
                        return;
                    }
                    Err(e) => {
                        // Only remote requests fail with an RPC error.
                        let Target::Remote(i) = target else { return };
                        match e {
                            RpcError::DeadlineExceeded | RpcError::Server(_) => Attempt {
                                failure: Some(Failure::System {
                                    message: format!(
                                        "worker {} did not run the test: {e}",
                                        self.remotes[i].label
                                    ),
                                }),
                                duration: Duration::ZERO,
                                output: Default::default(),
                                worker: Some(self.remotes[i].label.clone()),
                                kept_tmp: None,
                                leaked: Vec::new(),
                            },
                            RpcError::Shutdown | RpcError::Send(_) | RpcError::Channel(_) => {
                                // The connection is gone: the worker is lost, and with it this
                                // and every other request in flight there.
                                self.add_flight(id, flight);
                                let reason = format!("its connection failed ({e})");
                                self.lose(i, reason, reporters);
                                return;
                            }
                        }
                    }
                };
                match target {
                    Target::Remote(i) => {
                        self.remotes[i].ran += 1;
                        attempt.worker = Some(self.remotes[i].label.clone());
                        let binary = self.plan.tests[job.test].binary;
                        if let (Some(tree), Some(_)) = (self.tree_of(binary), &attempt.failure) {
                            let notes = missing_path_notes(
                                tree,
                                &attempt,
                                self.plan.tests[job.test].spec.cwd.as_deref(),
                                self.remotes[i].maps_paths,
                            );
                            for note in notes {
                                attempt
                                    .output
                                    .push(Stream::Stderr, note.as_bytes(), usize::MAX);
                            }
                        }
                        if let Some(Failure::System { message }) = &mut attempt.failure {
                            // The worker's words reach this terminal: escaped.
                            *message = crate::outcome::escape_control(message);
                            self.avoid.entry(job.test).or_default().insert(i);
                        }
                    }
                    Target::Local => self.ran_locally += 1,
                }
                if !self.plan.tests[job.test].spec.capture && target != Target::Local {
                    // `--nocapture`: a remote test's output is shown when it arrives.
                    print_output(&attempt);
                    attempt.output = Default::default();
                }
                self.running_since.remove(&job.test);
                if let Some(finished) = self.scheduler.record(job, attempt, true) {
                    let failed = finished.status == Status::Failed;
                    self.report(runner::into_report(self.plan, finished), reporters);
                    if failed && self.options.fail_fast {
                        self.stop(reporters);
                    }
                }
            }
        }
    }

    /// Declares worker `i` lost: its requests in flight are cancelled and requeued, and it is
    /// tried again after a back-off.
    fn lose(&mut self, i: usize, reason: String, reporters: &mut Reporters) {
        if !self.remotes[i].alive() {
            return;
        }
        self.detach(i);
        let jitter = self.jitter(i);
        let remote = &mut self.remotes[i];
        remote.failures = 0;
        remote.next_try = Instant::now() + backoff(0, jitter);
        let drained = remote.draining;
        let label = remote.label.clone();
        let ids: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.target == Target::Remote(i))
            .map(|(&id, _)| id)
            .collect();
        if drained && ids.is_empty() {
            notice(&format!(
                "worker {label} finished draining and closed the connection; it is tried again in the background"
            ));
            return;
        }
        warn(&format!(
            "lost worker {label}: {reason}; requeueing its {} test{} in flight; it is tried again in the background",
            ids.len(),
            if ids.len() == 1 { "" } else { "s" }
        ));
        self.remotes[i].warned = true;
        for id in ids {
            let Some(flight) = self.take_flight(id) else {
                continue;
            };
            flight.abort.abort();
            self.running_since.remove(&flight.job.test);
            if let Some(finished) = self.scheduler.worker_lost(flight.job) {
                self.report(runner::into_report(self.plan, finished), reporters);
            }
        }
        self.lost.push((label, reason));
    }

    fn report(&mut self, report: TestReport, reporters: &mut Reporters) {
        reporters.test_finished(&report);
        self.reports.push(report);
    }

    /// Stops the run: nothing more starts, requests in flight are cancelled (the workers kill
    /// those tests), and the rest is reported as not run. The tests so reported.
    fn stop(&mut self, reporters: &mut Reporters) -> Vec<usize> {
        let mut not_run = self.scheduler.stop();
        for (_, flight) in self.in_flight.drain() {
            flight.abort.abort();
            not_run.push(flight.job.test);
        }
        self.loads.clear();
        not_run.sort_unstable();
        not_run.dedup();
        let reported: HashSet<&str> = self.reports.iter().map(|r| r.name.as_str()).collect();
        let not_run: Vec<usize> = not_run
            .into_iter()
            .filter(|&t| !reported.contains(self.plan.tests[t].name.as_str()))
            .collect();
        for &test in &not_run {
            let report = TestReport {
                name: self.plan.tests[test].name.clone(),
                status: Status::NotRun,
                attempts: Vec::new(),
                rerun_after_lost_worker: false,
            };
            self.report(report, reporters);
        }
        not_run
    }

    fn slow_notices(&mut self, reporters: &mut Reporters) {
        for (&test, (since, noticed)) in self.running_since.iter_mut() {
            if !*noticed && since.elapsed() >= self.options.slow {
                *noticed = true;
                reporters.test_slow(&self.plan.tests[test].name, self.options.slow);
            }
        }
    }

    /// The input tree the tests of binary `binary` see, when one travels with it.
    fn tree_of(&self, binary: usize) -> Option<&Arc<Tree>> {
        let at = (*self.tree_of.get(binary)?)?;
        self.shipment.trees.get(at)
    }

    /// Brings back what the tests wrote that matches the trees' output patterns, from every
    /// worker still connected, into the same paths here. Content-addressed: a file already
    /// here with the same content, or fetched once already, is not downloaded again. The
    /// summary line, when anything matched.
    async fn fetch_outputs(&mut self, trees: &[Arc<Tree>]) -> Option<String> {
        if trees.iter().all(|t| t.manifest.outputs.is_empty()) {
            return None;
        }
        let mut fetched: HashMap<protocol::Digest, PathBuf> = HashMap::new();
        let (mut files, mut bytes, mut listed) = (0u64, 0u64, 0u64);
        let mut budget: u64 = inputs::DEFAULT_MAX;
        let with_outputs = trees.iter().filter(|t| !t.manifest.outputs.is_empty());
        let pairs: Vec<(&Remote, &Arc<Tree>)> = self
            .remotes
            .iter()
            .flat_map(|r| with_outputs.clone().map(move |t| (r, t)))
            .collect();
        for (remote, tree) in pairs {
            let Some(client) = &remote.client else {
                continue;
            };
            let Ok(list) = client
                .outputs(protocol::context_within(OUTPUTS_LIMIT), tree.digest)
                .await
            else {
                warn(&format!(
                    "cannot list the outputs of worker {}",
                    remote.label
                ));
                continue;
            };
            for file in list {
                listed += 1;
                let path = PathBuf::from(&file.path);
                if !tree.is_output(&file.path) || file.size > budget {
                    warn(&format!(
                        "worker {} offered `{}`, which is not an output of this run; ignored",
                        remote.label,
                        escape(&file.path)
                    ));
                    continue;
                }
                let current = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || inputs::digest_of(&path).ok()
                })
                .await
                .ok()
                .flatten();
                if current == Some(file.digest) {
                    continue;
                }
                let result = match fetched.get(&file.digest) {
                    Some(copy) => std::fs::copy(copy, &path)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    None => {
                        let data = download(client, &file).await;
                        match data {
                            Ok(data) => {
                                bytes += data.len() as u64;
                                budget = budget.saturating_sub(data.len() as u64);
                                write_atomically(&path, &data)
                            }
                            Err(e) => Err(e),
                        }
                    }
                };
                match result {
                    Ok(()) => {
                        files += 1;
                        fetched.insert(file.digest, path);
                    }
                    Err(e) => warn(&format!(
                        "cannot bring back {} from worker {}: {}",
                        path.display(),
                        remote.label,
                        escape(&e)
                    )),
                }
            }
        }
        (listed > 0).then(|| {
            format!(
                "dtf: outputs: {files} file{} came back ({bytes} bytes{})",
                if files == 1 { "" } else { "s" },
                if bytes >= 1024 {
                    format!(" = {}", human_bytes(bytes))
                } else {
                    String::new()
                }
            )
        })
    }

    /// Tells every connected worker the run is over, so it releases what it holds for the run
    /// now rather than keeping it for a reconnect.
    async fn finish(&mut self) {
        let calls = self
            .remotes
            .iter()
            .filter_map(|r| r.client.clone())
            .map(|client| async move {
                let _ = client.finish(protocol::context_within(FINISH_LIMIT)).await;
            });
        futures::future::join_all(calls).await;
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let per_worker: Vec<String> = self
            .remotes
            .iter()
            .filter(|r| r.connections > 0)
            .map(|r| {
                let shipped = if r.shipped > 0 {
                    format!(
                        ", shipped {} in {:.2}s",
                        human_bytes(r.shipped),
                        r.setup.as_secs_f64()
                    )
                } else {
                    String::new()
                };
                let again = match r.connections {
                    0 | 1 => String::new(),
                    n => format!(" (connected {n} times)"),
                };
                format!("{} ran {}{shipped}{again}", r.label, r.ran)
            })
            .collect();
        if !per_worker.is_empty() {
            notes.push(format!("dtf: {}", per_worker.join("; ")));
        }
        for (label, reason) in &self.lost {
            notes.push(format!(
                "dtf: lost worker {label} during the run ({reason}); its tests were rerun"
            ));
        }
        if self.ran_locally > 0 {
            notes.push(format!(
                "dtf: {} test attempt{} ran locally after every worker was lost",
                self.ran_locally,
                if self.ran_locally == 1 { "" } else { "s" }
            ));
        }
        if let Some(fatal) = &self.fatal {
            let names: Vec<&str> = self
                .not_run
                .iter()
                .map(|&t| self.plan.tests[t].name.as_str())
                .collect();
            notes.push(format!("dtf: error: {fatal}"));
            notes.push(not_run_line(&names, "every worker was lost"));
        }
        notes
    }
}

/// The most test names [`not_run_line`] lists.
const NOT_RUN_NAMES: usize = 20;

/// `dtf: 3 tests not run (every worker was lost): a, b, c`, naming at most
/// [`NOT_RUN_NAMES`] of them.
fn not_run_line(names: &[&str], why: &str) -> String {
    let shown: Vec<String> = names
        .iter()
        .take(NOT_RUN_NAMES)
        .map(|n| crate::outcome::escape_control(n))
        .collect();
    let more = match names.len().saturating_sub(NOT_RUN_NAMES) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    format!(
        "dtf: {} test{} not run ({why}){}{}{more}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        if names.is_empty() { "" } else { ": " },
        shown.join(", "),
    )
}

/// How long telling a worker the run is over may take.
const FINISH_LIMIT: Duration = Duration::from_secs(2);

/// How long listing a worker's outputs may take.
const OUTPUTS_LIMIT: Duration = Duration::from_secs(120);

/// Downloads one output file and checks its digest.
async fn download(client: &WorkerClient, file: &inputs::OutputFile) -> Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(file.size.min(64 << 20) as usize);
    while (data.len() as u64) < file.size {
        let piece = client
            .download(
                protocol::context_within(Duration::from_secs(60)),
                file.digest,
                data.len() as u64,
            )
            .await
            .map_err(|e| e.to_string())??;
        if piece.data.is_empty() {
            break;
        }
        data.extend_from_slice(&piece.data);
    }
    if protocol::Digest::of(&data) != file.digest {
        return Err("what arrived does not match its digest (changed on the worker?)".to_owned());
    }
    Ok(data)
}

/// Writes `data` to `path` through a temporary file in the same directory and a rename.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), String> {
    let parent = path.parent().ok_or("no parent directory")?;
    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(|e| e.to_string())?;
    tmp.write_all(data).map_err(|e| e.to_string())?;
    tmp.persist(path).map_err(|e| e.error.to_string())?;
    Ok(())
}

/// Notes for a failed remote attempt whose output names a path or a library that exists here
/// but was not shipped.
fn missing_path_notes(
    tree: &Tree,
    attempt: &Attempt,
    cwd: Option<&Path>,
    maps_paths: bool,
) -> Vec<String> {
    const MAX_NOTES: usize = 5;
    let mut text = attempt
        .failure
        .as_ref()
        .map(|f| f.to_string())
        .unwrap_or_default();
    for (_, chunk) in &attempt.output.chunks {
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(chunk));
    }
    let mut notes = Vec::new();
    // A library the loader did not find.
    const LOADER: &str = "error while loading shared libraries: ";
    if let Some(at) = text.find(LOADER) {
        let name: String = text[at + LOADER.len()..]
            .chars()
            .take_while(|c| *c != ':' && !c.is_whitespace())
            .collect();
        let search = std::env::var_os("LD_LIBRARY_PATH")
            .map(|v| std::env::split_paths(&v).collect::<Vec<_>>())
            .unwrap_or_default();
        let here = search
            .iter()
            .chain(
                [
                    PathBuf::from("/lib"),
                    PathBuf::from("/usr/lib"),
                    PathBuf::from("/usr/local/lib"),
                ]
                .iter(),
            )
            .map(|d| d.join(&name))
            .find(|p| p.is_file());
        notes.push(match here {
            Some(path) => format!(
                "dtf: note: the library {} exists on the coordinator at {} but was not shipped: dtf ships \
                 libraries only from the target directory and the toolchain's sysroot. Install it on the \
                 worker, or ship its directory with DTF_INCLUDE or `[package.metadata.dtf] include`\n",
                escape(&name),
                path.display()
            ),
            None => format!(
                "dtf: note: the library {} is missing on the worker and was not found on the coordinator either\n",
                escape(&name)
            ),
        });
    }
    let not_found = text.contains("No such file or directory")
        || text.contains("NotFound")
        || text.contains("not found")
        || matches!(attempt.failure, Some(Failure::ExitedEarly { code: 127 }));
    if not_found {
        // The loader's message names the binary's path on the worker: not a path to ship.
        let text: String = text
            .lines()
            .filter(|l| !l.contains(LOADER) && !l.starts_with("dtf: note:"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut seen = HashSet::new();
        for word in text.split(|c: char| c.is_whitespace() || "\"'`()[]{},;".contains(c)) {
            let word = word.trim_end_matches([':', '.']);
            if word.len() < 2 || !(word.contains('/') || word.contains('.')) || word.contains("://")
            {
                continue;
            }
            let path = match cwd {
                _ if word.starts_with('/') => PathBuf::from(word),
                Some(cwd) => cwd.join(word),
                None => continue,
            };
            if !seen.insert(path.clone()) || !path.exists() || tree.contains(&path) {
                continue;
            }
            let shown = cwd
                .and_then(|c| path.strip_prefix(c).ok())
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| path.display().to_string());
            notes.push(format!(
                "dtf: note: `{}` exists on the coordinator but was not shipped to the worker (it is ignored by \
                 .gitignore or .ignore, excluded, or outside what dtf ships){}. To ship it, add it to \
                 `[package.metadata.dtf] include = [\"{}\"]` in Cargo.toml, or set DTF_INCLUDE={}\n",
                escape(&path.display().to_string()),
                if maps_paths { "" } else { "; this worker also cannot map paths, so absolute paths do not resolve there" },
                escape(&shown),
                escape(&shown)
            ));
            if notes.len() >= MAX_NOTES {
                break;
            }
        }
    }
    notes
}

/// Pings a worker every [`PING_EVERY`], each with a [`PING_LIMIT`] deadline, reporting each
/// result. Pings overlap, so a hung worker is noticed [`PING_LIMIT`] after its first missed
/// ping and declared lost about a second later.
async fn heartbeat(
    worker: usize,
    generation: u64,
    client: WorkerClient,
    tx: mpsc::UnboundedSender<Event>,
) {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let client = client.clone();
                pending.push(async move {
                    match tokio::time::timeout(PING_LIMIT, client.ping(protocol::context_within(PING_LIMIT))).await {
                        Ok(Ok(beat)) => Some(beat),
                        _ => None,
                    }
                });
            }
            Some(beat) = pending.next(), if !pending.is_empty() => {
                if tx.send(Event::Ping { worker, generation, beat }).is_err() {
                    return;
                }
            }
        }
    }
}

/// The request context of a run: its deadline covers the test's timeout plus time waiting
/// for a slot, or a week for a test without a timeout (the worker enforces the timeout
/// itself; the deadline only bounds a request that would otherwise never end).
fn run_context(timeout: Option<Duration>) -> tarpc::context::Context {
    protocol::context_within(match timeout {
        Some(t) => t + QUEUE_ALLOWANCE,
        None => NO_TIMEOUT_DEADLINE,
    })
}

/// The spec sent to a worker: the token is never part of a test's environment on the wire.
fn remote_spec(spec: &RunSpec) -> RunSpec {
    let mut spec = spec.clone();
    spec.env.retain(|(name, _)| {
        name != protocol::TOKEN_VAR && name != "DTF_WORKERS" && name != OUTPUT_CAP_VAR
    });
    // The output cap travels in the environment (the worker takes it out before the test runs).
    if let Some(cap) = std::env::var(OUTPUT_CAP_VAR).ok().filter(|v| !v.is_empty()) {
        spec.env.push((OUTPUT_CAP_VAR.to_owned(), cap));
    }
    spec
}

/// Prints a remote attempt's output to this process's stdout and stderr (`--nocapture`).
fn print_output(attempt: &Attempt) {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    for (stream, bytes) in &attempt.output.chunks {
        let _ = match stream {
            Stream::Stdout => stdout.write_all(bytes),
            Stream::Stderr => stderr.write_all(bytes),
        };
    }
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_does_not_travel_in_the_environment() {
        let spec = RunSpec {
            test: "t".into(),
            isolation: crate::registry::Isolation::Process,
            env: vec![
                ("DTF_TOKEN".into(), "secret".into()),
                ("PATH".into(), "/bin".into()),
            ],
            timeout: None,
            memory: None,
            capture: true,
            cwd: None,
            leak_fails: false,
            spawn: Default::default(),
            harness: Default::default(),
        };
        assert_eq!(
            remote_spec(&spec).env,
            vec![("PATH".to_owned(), "/bin".to_owned())]
        );
    }

    #[test]
    fn retries_back_off_doubling_to_a_cap_with_bounded_jitter() {
        let ms = |failures, jitter| backoff(failures, jitter).as_millis();
        // Without jitter's spread (0.5 scales by 1): 250 ms, doubling, capped at 5 s.
        let schedule: Vec<u128> = (0..8).map(|f| ms(f, 0.5)).collect();
        assert_eq!(schedule, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        // Jitter scales each wait by 0.75 to 1.25, never more.
        assert_eq!(ms(0, 0.0), 187);
        assert_eq!(ms(2, 1.0), 1250);
        assert_eq!(ms(40, 1.0), 6250);
        assert_eq!(ms(u32::MAX, 7.0), 6250);
    }

    #[test]
    fn tests_not_run_are_counted_and_named_up_to_a_bound() {
        assert_eq!(
            not_run_line(&["a", "b"], "why"),
            "dtf: 2 tests not run (why): a, b"
        );
        assert_eq!(not_run_line(&[], "why"), "dtf: 0 tests not run (why)");
        let many: Vec<String> = (0..25).map(|i| format!("t{i}")).collect();
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        let line = not_run_line(&names, "why");
        assert!(
            line.starts_with("dtf: 25 tests not run (why): t0, t1,"),
            "{line}"
        );
        assert!(line.ends_with("t19 and 5 more"), "{line}");
        assert_eq!(
            not_run_line(&["bad\u{1b}[2Jname"], "w"),
            "dtf: 1 test not run (w): bad\\u{1b}[2Jname"
        );
    }

    #[test]
    fn long_tests_get_long_deadlines() {
        let ctx = run_context(Some(Duration::from_secs(30)));
        assert!(ctx.deadline > Instant::now() + Duration::from_secs(3600));
        let ctx = run_context(None);
        assert!(ctx.deadline > Instant::now() + Duration::from_secs(24 * 3600));
    }
}
