//! `dtf-worker`: runs the tests of dtf test binaries for coordinators on other machines.
//!
//! ```text
//! dtf-worker [--listen ADDR] [--slots N] [--cache-dir DIR] [--cache-max SIZE] [--token-file FILE]
//!            [--http ADDR] [--log-format text|json]
//! dtf-worker status ADDR... [--json]
//! dtf-worker drain ADDR
//! dtf-worker token [--out FILE]
//! ```
//!
//! See `docs/distributed.md` for the protocol and the security model.

#![warn(missing_docs)]

mod admission;
mod cache;
mod fair;
mod http;
mod metrics;
mod service;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use dtf::outcome::{format_duration, format_size};
use dtf::protocol::{self, ConnectError, Hello, Token, TokenError, WorkerStatus, human_bytes};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

/// How long `status` waits for a worker.
const STATUS_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "dtf-worker",
    version,
    about = "Runs the tests of dtf test binaries for coordinators (`DTF_WORKERS=host:port cargo test`).",
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_help = "Environment: DTF_TOKEN (the shared token, instead of --token-file), DTF_TOKEN_FILE, \
                  DTF_LOG or RUST_LOG (log filter, default `info,tarpc=warn`). Anyone holding the token can run \
                  any code as this worker's user: keep it secret."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a worker's state: slots, running tests, cache, uptime. Several addresses, or a
    /// `dns:NAME:PORT` naming several workers, print one table for the fleet.
    Status {
        /// The workers: host:port (the port defaults to 7878), dns:NAME:PORT (every address of
        /// NAME), file:PATH.
        #[arg(required = true, value_name = "ADDR")]
        addrs: Vec<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Read the token from this file (else DTF_TOKEN or DTF_TOKEN_FILE).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Drain a worker, as SIGTERM does: it takes no new tests, coordinators take back what
    /// they queued there, running tests finish (up to its --drain-timeout), then it exits.
    Drain {
        /// The worker's address, host:port (the port defaults to 7878).
        addr: String,
        /// Read the token from this file (else DTF_TOKEN or DTF_TOKEN_FILE).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Make a new token: 256 random bits as 64 hex characters, printed on stdout or written to
    /// FILE with mode 600.
    Token {
        /// Write the token to this file (created or replaced, mode 600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The address to listen on. Port 0 picks a free port; the bound address is printed on
    /// stdout as the first line.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7878")]
    listen: String,
    /// Tests run at once (default: the available parallelism).
    #[arg(long, value_name = "N")]
    slots: Option<usize>,
    /// Where test binaries are cached (default: $XDG_CACHE_HOME/dtf-worker or
    /// ~/.cache/dtf-worker).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The cache's cap; least recently used binaries are evicted past it.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size)]
    cache_max: u64,
    /// Read the shared token from this file (else DTF_TOKEN or DTF_TOKEN_FILE). Required
    /// unless listening on a loopback address.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The worker's name in reports (default: host name and port).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Shut down when standard input closes (for a parent that starts the worker and may die).
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// Serve `/healthz`, `/readyz`, `/metrics` (Prometheus) and a status page at `/` on this
    /// address (off by default). It needs no token: nothing on it can start work. Port 0 picks
    /// a free port; the bound address is printed on stdout after the listening line.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// How log lines on stderr look: `text` for people, `json` for log collectors (one JSON
    /// object a line, with timestamp, level, target and fields).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// On SIGTERM (or `dtf-worker drain`), how long running tests may go on before the worker
    /// kills what is left and exits.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    drain_timeout: Duration,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON lines.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    dtf::cli::parse_duration(s)
}

fn parse_size(s: &str) -> Result<u64, String> {
    dtf::cli::parse_size(s)
}

/// Why the worker cannot start or `status` cannot answer.
#[derive(Debug, Error)]
enum WorkerError {
    #[error("invalid --listen `{addr}`: {error}")]
    BadListen { addr: String, error: std::io::Error },
    #[error(
        "refusing to listen on {addr} without a token: anyone who can connect could run any code as this user. \
         Set --token-file or DTF_TOKEN_FILE ({how}), or listen on a loopback address (127.0.0.1)",
        how = protocol::HOW_TO_MAKE_A_TOKEN
    )]
    NoToken { addr: String },
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("--slots must be at least 1")]
    NoSlots,
    #[error(
        "cannot find a cache directory: set --cache-dir (neither XDG_CACHE_HOME nor HOME is set)"
    )]
    NoCacheDir,
    #[error("cannot open the cache at {dir}: {error}")]
    Cache { dir: String, error: std::io::Error },
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("invalid --http `{addr}`: {error} (expected HOST:PORT, e.g. 127.0.0.1:7879)")]
    BadHttp { addr: String, error: std::io::Error },
    #[error("cannot serve HTTP on {addr}: {error}")]
    HttpBind { addr: String, error: std::io::Error },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot prepare the tests' temporary directories: {0}")]
    TempDir(String),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("cannot make a token: {0}")]
    NewToken(std::io::Error),
    #[error("cannot write the token to {path}: {error}")]
    WriteToken { path: String, error: std::io::Error },
    #[error("{addr}: the worker did not answer `{call}`: {error}")]
    Status {
        addr: String,
        call: &'static str,
        error: tarpc::client::RpcError,
    },
    #[error("{0}")]
    Workers(String),
    #[error("{0} of the workers did not answer (see the table)")]
    SomeUnreachable(usize),
}

fn main() -> ExitCode {
    // The per-test process of a libtest binary's test is this binary started again in the
    // child role: it runs the stages (limits, namespaces) and then execs the test binary.
    if let Some(spec) = dtf::sandbox::child::take_spec() {
        dtf::sandbox::child::run(spec);
    }
    let cli = Cli::parse();
    if let Some(Command::Token { out }) = &cli.command {
        return match new_token(out.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    init_logging(cli.serve.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(WorkerError::Runtime(e)),
    };
    let result = match cli.command {
        Some(Command::Status {
            addrs,
            json,
            token_file,
        }) => runtime.block_on(status(&addrs, json, token_file.as_deref())),
        Some(Command::Drain { addr, token_file }) => {
            runtime.block_on(drain(&addr, token_file.as_deref()))
        }
        Some(Command::Token { .. }) => Ok(()),
        None => runtime.block_on(serve(cli.serve)),
    };
    // Tasks still alive (test handlers) are dropped here, which kills their tests.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: WorkerError) -> ExitCode {
    eprintln!("dtf-worker: error: {e}");
    ExitCode::from(2)
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = ["DTF_LOG", "RUST_LOG"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "info,tarpc=warn".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("dtf-worker: ignoring the log filter `{filter}`: {e}");
        EnvFilter::new("info,tarpc=warn")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// `dtf-worker token [--out FILE]`.
fn new_token(out: Option<&Path>) -> Result<(), WorkerError> {
    let text = Token::random_text().map_err(WorkerError::NewToken)?;
    match out {
        None => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{text}");
            let _ = stdout.flush();
        }
        Some(path) => {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let write = || -> std::io::Result<()> {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)?;
                // An existing file keeps its mode on open: make it 600 before writing.
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                file.write_all(format!("{text}\n").as_bytes())?;
                file.sync_all()
            };
            write().map_err(|error| WorkerError::WriteToken {
                path: path.display().to_string(),
                error,
            })?;
            eprintln!(
                "dtf-worker: wrote a new token to {} (mode 600); start workers with --token-file {0} and give \
                 coordinators DTF_TOKEN_FILE={0}",
                path.display()
            );
        }
    }
    Ok(())
}

fn load_token(file: Option<&Path>) -> Result<Option<Token>, TokenError> {
    let file =
        file.map(Path::to_path_buf)
            .or_else(|| match std::env::var_os(protocol::TOKEN_VAR) {
                Some(v) if !v.is_empty() => None,
                _ => std::env::var_os(protocol::TOKEN_FILE_VAR)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from),
            });
    if let Some(path) = &file {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "the token file {} is readable or writable by other users (mode {:o}): anyone who reads it can run any code as this worker's user; `chmod 600` it",
                    path.display(),
                    mode & 0o777
                );
            }
        }
    }
    match file {
        Some(path) => Token::from_file(&path).map(Some),
        None => Token::from_env(),
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    Some(dtf::config::user_cache_dir()?.join("dtf-worker"))
}

/// Raises the soft open-file limit to the hard limit; the soft limit in force afterwards.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            return soft;
        }
        return hard;
    }
    soft
}

async fn serve(args: ServeArgs) -> Result<(), WorkerError> {
    let token = load_token(args.token_file.as_deref())?;
    let nofile = raise_nofile();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&args.listen)
        .await
        .map_err(|error| WorkerError::BadListen {
            addr: args.listen.clone(),
            error,
        })?
        .collect();
    let Some(&addr) = addrs.first() else {
        return Err(WorkerError::BadListen {
            addr: args.listen.clone(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        });
    };
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(WorkerError::NoToken {
            addr: addr.to_string(),
        });
    }
    let slots = match args.slots {
        Some(0) => return Err(WorkerError::NoSlots),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let cache_dir = match args.cache_dir {
        Some(dir) => dir,
        None => default_cache_dir().ok_or(WorkerError::NoCacheDir)?,
    };
    let cache =
        cache::Cache::open(&cache_dir, args.cache_max).map_err(|error| WorkerError::Cache {
            dir: cache_dir.display().to_string(),
            error,
        })?;
    // Tests' directories go into a locked run directory; directories left by a worker that
    // was killed (its lock is free) are removed here,
    // before the worker announces itself.
    let run_dir = dtf::sandbox::rundir::RunDir::create_in(&std::env::temp_dir())
        .map_err(WorkerError::TempDir)?;
    let listener = bind(addr).map_err(|error| WorkerError::Bind {
        addr: addr.to_string(),
        error,
    })?;
    let local = listener.local_addr().map_err(|error| WorkerError::Bind {
        addr: addr.to_string(),
        error,
    })?;
    let http = match &args.http {
        None => None,
        Some(spec) => {
            let addr = tokio::net::lookup_host(spec)
                .await
                .map_err(|error| WorkerError::BadHttp {
                    addr: spec.clone(),
                    error,
                })?
                .next()
                .ok_or_else(|| WorkerError::BadHttp {
                    addr: spec.clone(),
                    error: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
                })?;
            let listener =
                TcpListener::bind(addr)
                    .await
                    .map_err(|error| WorkerError::HttpBind {
                        addr: addr.to_string(),
                        error,
                    })?;
            let bound = listener
                .local_addr()
                .map_err(|error| WorkerError::HttpBind {
                    addr: addr.to_string(),
                    error,
                })?;
            Some((listener, bound))
        }
    };
    let name = args.name.unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| local.ip().to_string());
        format!("{host}:{}", local.port())
    });

    // The first line of stdout is the bound address (a parent that asked for port 0 reads it).
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "dtf-worker listening on {local}");
        if let Some((_, bound)) = &http {
            let _ = writeln!(out, "dtf-worker serving HTTP on {bound}");
        }
        let _ = out.flush();
    }
    info!(
        %local,
        name = %name,
        slots,
        cache = %cache_dir.display(),
        cache_max = %format_size(args.cache_max),
        auth = token.is_some(),
        nofile,
        "serving"
    );

    if let Err(reason) = dtf::sandbox::namespaces::probe() {
        tracing::warn!(
            "isolation level `full` is not available on this worker, its tests will fail here: {reason}"
        );
    }
    if nix::unistd::geteuid().is_root() {
        tracing::warn!(
            "running as root: whoever holds the token can run any code as root; prefer an unprivileged user"
        );
    }
    // Each test's process maps the coordinator's paths in a private mount namespace; where the
    // kernel refuses, tests run from copies at other paths, and coordinators are told.
    let path_mapping = match dtf::sandbox::paths::probe() {
        Ok(()) => None,
        Err(reason) => {
            tracing::warn!(
                "this worker cannot map the coordinator's paths for its tests, they run from copies at other paths: {reason}"
            );
            Some(reason)
        }
    };
    let shared = service::Shared::new(
        name,
        slots,
        cache,
        run_dir.path().to_path_buf(),
        path_mapping,
        args.drain_timeout,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(stop_on_signals(shared.clone(), stop_tx.clone()));
    {
        // From the stop signal on, the worker takes no new work: /readyz says so.
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            if stop.wait_for(|stopped| *stopped).await.is_ok() {
                shared.set_draining(true);
            }
        });
    }
    if let Some((listener, bound)) = http {
        info!(http = %bound, "serving /healthz, /readyz, /metrics and the status page");
        tokio::spawn(http::serve(listener, shared.clone(), stop_rx.clone()));
    }
    if args.exit_on_stdin_eof {
        std::thread::spawn(move || {
            // Blocks until the parent closes our stdin (or dies).
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            info!("standard input closed: shutting down");
            stop_tx.send_replace(true);
        });
    }
    let limits = admission::Limits::for_nofile(nofile);
    info!(
        nofile,
        total = limits.max_total,
        per_source = limits.max_per_source,
        "unauthenticated connections are capped"
    );
    let gate = service::Gate::new(limits);
    service::serve(listener, shared, token, gate, stop_rx).await;
    info!("stopped");
    Ok(())
}

/// Listens on `addr` with a long accept queue (4096, or the kernel's cap), so that a flood of
/// connections does not crowd a coordinator out of the queue before the worker accepts it.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// SIGINT stops at once. SIGTERM (or a `drain` call) drains: no new tests, queued ones are
/// declined, running ones finish; then, or after `--drain-timeout`, or at a second SIGTERM or
/// SIGINT (which kill what is left), the worker stops.
async fn stop_on_signals(shared: std::sync::Arc<service::Shared>, stop: watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut drain = shared.drain_signal();
    tokio::select! {
        _ = int.recv() => {
            info!("SIGINT: shutting down");
            stop.send_replace(true);
            return;
        }
        _ = term.recv() => {
            shared.start_drain();
            info!("SIGTERM: draining");
        }
        _ = drain.wait_for(|d| *d) => info!("drain requested: draining"),
    }
    let timeout = shared.drain_timeout;
    info!(
        running = shared.active(),
        timeout = %format_duration(timeout),
        "draining: taking no new tests, letting the running ones finish (a second SIGTERM or SIGINT kills them)"
    );
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = int.recv() => {
                tracing::warn!(running = shared.active(), "SIGINT while draining: killing the tests still running");
                break;
            }
            _ = term.recv() => {
                tracing::warn!(running = shared.active(), "second SIGTERM while draining: killing the tests still running");
                break;
            }
            _ = &mut deadline => {
                tracing::warn!(running = shared.active(), "the drain timeout ({}) passed: killing the tests still running", format_duration(timeout));
                break;
            }
            _ = poll.tick() => {
                if shared.active() == 0 {
                    info!("drained: no test is running");
                    break;
                }
            }
        }
    }
    stop.send_replace(true);
}

/// `host` alone gets the default port.
fn with_port(addr: &str) -> String {
    if addr.contains(':') {
        addr.to_owned()
    } else {
        format!("{addr}:{}", protocol::DEFAULT_PORT)
    }
}

/// Asks the worker at `addr` for its status.
async fn status_of(addr: &str, token: Option<&Token>) -> Result<WorkerStatus, WorkerError> {
    let hello = Hello {
        run: "dtf-worker status".to_owned(),
        key: None,
    };
    let conn = protocol::connect(addr, token, hello, STATUS_LIMIT).await?;
    conn.client
        .status(protocol::context_within(STATUS_LIMIT))
        .await
        .map_err(|error| WorkerError::Status {
            addr: addr.to_owned(),
            call: "status",
            error,
        })
}

/// `dtf-worker status ADDR...`: one worker in detail, or a table for several.
async fn status(
    addrs: &[String],
    json: bool,
    token_file: Option<&Path>,
) -> Result<(), WorkerError> {
    let token = load_token(token_file)?;
    let fleet = addrs.len() > 1
        || addrs
            .iter()
            .any(|a| a.starts_with("dns:") || a.starts_with("file:"));
    if !fleet {
        let addr = with_port(&addrs[0]);
        let status = status_of(&addr, token.as_ref()).await?;
        let text = if json {
            serde_json::to_string_pretty(&status).unwrap_or_default() + "\n"
        } else {
            render_status(&status)
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        return Ok(());
    }
    let spec = addrs
        .iter()
        .map(|a| {
            if a.starts_with("dns:") || a.starts_with("file:") {
                a.clone()
            } else {
                with_port(a)
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let entries = match dtf::coordinator::WorkersSpec::parse(&spec, "the addresses")
        .map_err(WorkerError::Workers)?
    {
        dtf::coordinator::WorkersSpec::Remote(entries) => entries,
        dtf::coordinator::WorkersSpec::Local(_) => {
            return Err(WorkerError::Workers(
                "local:N names no running worker; give addresses".to_owned(),
            ));
        }
    };
    let (endpoints, problems) = dtf::coordinator::workers::resolve(&entries, STATUS_LIMIT).await;
    for problem in &problems {
        eprintln!("dtf-worker: warning: {}", problem.escape_debug());
    }
    if endpoints.is_empty() {
        return Err(WorkerError::Workers(
            "no worker address found (see the warnings)".to_owned(),
        ));
    }
    let answers = futures::future::join_all(endpoints.iter().map(|e| {
        let token = token.as_ref();
        async move { (e.label.clone(), status_of(&e.addr, token).await) }
    }))
    .await;
    let failed = answers.iter().filter(|(_, r)| r.is_err()).count();
    let text = if json {
        let rows: Vec<serde_json::Value> = answers
            .iter()
            .map(|(addr, r)| match r {
                Ok(s) => serde_json::json!({ "addr": addr, "status": s }),
                Err(e) => serde_json::json!({ "addr": addr, "error": e.to_string() }),
            })
            .collect();
        serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n"
    } else {
        render_fleet(&answers)
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    if failed > 0 {
        return Err(WorkerError::SomeUnreachable(failed));
    }
    Ok(())
}

/// One line per worker, and a total.
fn render_fleet(answers: &[(String, Result<WorkerStatus, WorkerError>)]) -> String {
    let mut rows = vec![
        [
            "ADDRESS",
            "NAME",
            "STATE",
            "PROTO",
            "SLOTS",
            "RUNNING",
            "WAITING",
            "RUNS",
            "TESTS RUN",
            "UPTIME",
        ]
        .map(str::to_owned),
    ];
    let (mut slots, mut running, mut waiting, mut tests, mut up) = (0u64, 0usize, 0u64, 0u64, 0);
    for (addr, answer) in answers {
        match answer {
            Ok(s) => {
                up += 1;
                slots += u64::from(s.slots);
                running += s.running.len();
                waiting += u64::from(s.waiting);
                tests += s.tests_run;
                rows.push([
                    addr.clone(),
                    s.name.escape_debug().to_string(),
                    if s.draining { "draining" } else { "ready" }.to_owned(),
                    s.protocol.to_string(),
                    s.slots.to_string(),
                    s.running.len().to_string(),
                    s.waiting.to_string(),
                    s.connections.to_string(),
                    s.tests_run.to_string(),
                    format_duration(Duration::from_secs(s.uptime_secs.max(1))),
                ]);
            }
            Err(e) => {
                let mut row: [String; 10] = Default::default();
                row[0] = addr.clone();
                row[1] = "-".to_owned();
                row[2] = format!("unreachable: {}", e.to_string().escape_debug());
                rows.push(row);
            }
        }
    }
    let widths: Vec<usize> = (0..10)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c == 2 && row[2].starts_with("unreachable") {
                line.push_str(cell);
                break;
            }
            line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{up} of {} workers answered: {slots} slots, {running} running, {waiting} waiting, {tests} tests run\n",
        answers.len()
    ));
    out
}

/// `dtf-worker drain ADDR`.
async fn drain(addr: &str, token_file: Option<&Path>) -> Result<(), WorkerError> {
    let token = load_token(token_file)?;
    let addr = with_port(addr);
    let hello = Hello {
        run: "dtf-worker drain".to_owned(),
        key: None,
    };
    let conn = protocol::connect(&addr, token.as_ref(), hello, STATUS_LIMIT).await?;
    let answer = conn
        .client
        .drain(protocol::context_within(STATUS_LIMIT))
        .await
        .map_err(|error| WorkerError::Status {
            addr: addr.clone(),
            call: "drain",
            error,
        })?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{addr}: {}; {} test{} running, which may take up to {} before the worker kills what is left and exits",
        if answer.started {
            "draining"
        } else {
            "already draining"
        },
        answer.running,
        if answer.running == 1 { "" } else { "s" },
        format_duration(Duration::from_secs(answer.timeout_secs.max(1)))
    );
    let _ = out.flush();
    Ok(())
}

/// The human `status` output. Names, labels and test names come from peers and tests: control
/// characters in them are shown escaped, so they cannot forge lines or move the cursor.
fn render_status(s: &WorkerStatus) -> String {
    use dtf::outcome::escape_control as esc;
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!(
        "worker      {} (dtf-worker {}, protocol {})",
        esc(&s.name),
        esc(&s.version),
        s.protocol
    ));
    line(format!(
        "uptime      {}",
        format_duration(Duration::from_secs(s.uptime_secs.max(1)))
    ));
    line(format!(
        "slots       {} ({} running, {} waiting)",
        s.slots,
        s.running.len(),
        s.waiting
    ));
    line(format!("runs        {} connected", s.connections));
    if s.draining {
        line("state       draining (takes no new tests)".to_owned());
    }
    line(format!("tests run   {}", s.tests_run));
    line(format!(
        "cache       {} blobs (binaries and input files), {} of {}; {} hits, {} misses; {} received",
        s.cache_entries,
        human_bytes(s.cache_bytes),
        human_bytes(s.cache_max),
        s.cache_hits,
        s.cache_misses,
        human_bytes(s.bytes_received)
    ));
    if !s.running.is_empty() {
        line("running".to_owned());
        for r in &s.running {
            line(format!(
                "  {}  for {}  ({})",
                esc(&r.test),
                format_duration(Duration::from_millis(r.running_ms.max(1))),
                esc(&r.run)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses() {
        let cli =
            Cli::try_parse_from(["dtf-worker", "--listen", "127.0.0.1:0", "--slots", "3"]).unwrap();
        assert_eq!(cli.serve.slots, Some(3));
        assert_eq!(cli.serve.cache_max, 4 << 30);
        let cli = Cli::try_parse_from(["dtf-worker", "status", "h:1", "--json"]).unwrap();
        assert_eq!(cli.serve.drain_timeout, Duration::from_secs(300));
        assert!(matches!(
            cli.command,
            Some(Command::Status { json: true, .. })
        ));
        assert!(Cli::try_parse_from(["dtf-worker", "--cache-max", "lots"]).is_err());
        let cli = Cli::try_parse_from([
            "dtf-worker",
            "--http",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.serve.http.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(cli.serve.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["dtf-worker", "--log-format", "xml"]).is_err());
        let cli = Cli::try_parse_from(["dtf-worker", "token", "--out", "f"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Token { out: Some(_) })));
    }
}
