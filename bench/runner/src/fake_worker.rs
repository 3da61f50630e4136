//! `dtf-fake-worker`: a worker for benchmarks that speaks dtf's real protocol (the library's
//! greeting, Noise handshake, record layer, frame codec and `Worker` service) but starts no
//! process: each `run` holds one of its slots for `--duration-ms` and then reports a pass. It
//! claims to have every binary and input tree, so nothing is uploaded. Many coordinators may
//! connect at once; its slots are shared among them, first come first served.
//!
//! It measures the coordinator's dispatch ceiling: a run of trivial tests on fake workers with
//! 1,000 slots in all is bounded by how fast the coordinator sends requests and takes results.
//!
//! ```sh
//! DTF_TOKEN=... dtf-fake-worker --count 10 --slots 100 --duration-ms 20
//! ```
//!
//! It prints one `listening ADDR` line per worker, then serves until it is killed (it holds no
//! state).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use dtf::protocol::{
    self, Beat, Chunk, Declined, Digest, Download, DrainStarted, Hello, InputsReady, RunRequest,
    RunResponse, Token, UploadError, UploadProgress, Worker, WorkerInfo, WorkerStatus,
};
use futures::StreamExt;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(
    name = "dtf-fake-worker",
    about = "A dtf worker that completes tests without running them"
)]
struct Args {
    /// How many workers to start (each on its own port of 127.0.0.1).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Slots of each worker.
    #[arg(long, default_value_t = 100)]
    slots: u32,
    /// How long each test holds its slot.
    #[arg(long, default_value_t = 0)]
    duration_ms: u64,
}

#[derive(Clone)]
struct Fake {
    name: String,
    slots: u32,
    duration: Duration,
    permits: Arc<Semaphore>,
    ran: Arc<AtomicU64>,
    started: Instant,
}

impl Worker for Fake {
    async fn hello(self, _: Context, _hello: Hello) -> WorkerInfo {
        WorkerInfo {
            name: self.name.clone(),
            slots: self.slots,
            version: format!("fake {}", env!("CARGO_PKG_VERSION")),
            path_mapping: None,
            draining: false,
        }
    }

    async fn missing(self, _: Context, _digests: Vec<Digest>) -> Vec<Digest> {
        Vec::new()
    }

    async fn upload(self, _: Context, _chunk: Chunk) -> Result<UploadProgress, UploadError> {
        Ok(UploadProgress::Stored)
    }

    async fn run(self, _: Context, _request: RunRequest) -> Result<RunResponse, Declined> {
        let _slot = self.permits.acquire().await;
        let started = Instant::now();
        if !self.duration.is_zero() {
            tokio::time::sleep(self.duration).await;
        }
        self.ran.fetch_add(1, Ordering::Relaxed);
        Ok(RunResponse {
            failure: None,
            duration: started.elapsed(),
            output: Default::default(),
            leaked: Vec::new(),
            worker: self.name.clone(),
        })
    }

    async fn prepare_inputs(self, _: Context, _manifest: Digest) -> Result<InputsReady, String> {
        Ok(InputsReady { files: 0, bytes: 0 })
    }

    async fn outputs(self, _: Context, _manifest: Digest) -> Vec<dtf::inputs::OutputFile> {
        Vec::new()
    }

    async fn download(self, _: Context, _digest: Digest, _offset: u64) -> Result<Download, String> {
        Err("a fake worker holds no files".to_owned())
    }

    async fn ping(self, _: Context) -> Beat {
        Beat {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            draining: false,
        }
    }

    async fn drain(self, _: Context) -> DrainStarted {
        DrainStarted {
            started: false,
            running: 0,
            timeout_secs: 0,
        }
    }

    async fn finish(self, _: Context) {}

    async fn status(self, _: Context) -> WorkerStatus {
        WorkerStatus {
            name: self.name.clone(),
            version: format!("fake {}", env!("CARGO_PKG_VERSION")),
            protocol: protocol::PROTOCOL_VERSION,
            slots: self.slots,
            connections: 0,
            running: Vec::new(),
            waiting: 0,
            tests_run: self.ran.load(Ordering::Relaxed),
            cache_entries: 0,
            cache_bytes: 0,
            cache_max: 0,
            cache_hits: 0,
            cache_misses: 0,
            bytes_received: 0,
            uptime_secs: self.started.elapsed().as_secs(),
            draining: false,
        }
    }
}

async fn serve(listener: TcpListener, fake: Fake, token: Arc<Token>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let fake = fake.clone();
        let token = token.clone();
        tokio::spawn(async move {
            protocol::configure_socket(&stream);
            let Ok(secure) = protocol::server_handshake(stream, Some(&token)).await else {
                return;
            };
            let channel = BaseChannel::with_defaults(protocol::server_transport(secure));
            let mut requests = Box::pin(channel.max_concurrent_requests(100_000).requests());
            while let Some(Ok(request)) = requests.next().await {
                tokio::spawn(request.execute(fake.clone().serve()));
            }
        });
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let token = match Token::from_env() {
        Ok(Some(token)) => Arc::new(token),
        Ok(None) => {
            eprintln!("error: set DTF_TOKEN (or DTF_TOKEN_FILE) to the coordinators' token");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for i in 0..args.count.max(1) {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on 127.0.0.1: {e}");
                std::process::exit(1);
            }
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        };
        addrs.push(addr);
        let fake = Fake {
            name: format!("fake-{i}"),
            slots: args.slots,
            duration: Duration::from_millis(args.duration_ms),
            permits: Arc::new(Semaphore::new(args.slots as usize)),
            ran: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        };
        tokio::spawn(serve(listener, fake, token.clone()));
    }
    for addr in &addrs {
        println!("listening {addr}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    futures::future::pending::<()>().await;
}
