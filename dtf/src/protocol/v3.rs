//! Protocol version 3, frozen: the messages a coordinator of the previous release sends and
//! expects, its client side, and the translation a worker of this release applies to serve it.
//!
//! A worker serves coordinators of its own protocol version and of the previous one (see
//! [`super::ACCEPTED_VERSIONS`]), so workers can be upgraded before coordinators. Version 4
//! changed `hello` (a run key), `run` (it may decline), `ping` (it says when the worker is
//! draining) and `status`, and added `drain` and `finish`; those messages are kept here as version 3 had
//! them. The calls whose types did not change (`missing`, `upload`, `prepare_inputs`,
//! `outputs`, `download`) share the current types: changing one of them is a wire change, which
//! needs a new version and a frozen copy of the old type here.
//!
//! Nothing here may change: the end-to-end test `a_v3_coordinator_runs_a_test_on_this_worker`
//! runs a test through this client against a current worker.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

use super::messages as current;
use super::messages::{Chunk, Digest, Download, InputsReady, RunRequest, RunResponse};
use super::messages::{UploadError, UploadProgress};
use super::transport::{FrameCodec, MAX_FRAME, MAX_REQUEST_FRAME, SecureStream};
use super::{ConnectError, Token};
use crate::outcome::Failure;

/// This version's number.
pub const VERSION: u32 = 3;

/// Version 3's hello: a label only.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// A label for the run.
    pub run: String,
}

/// Version 3's answer to hello.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker's name.
    pub name: String,
    /// Tests it runs at once.
    pub slots: u32,
    /// The `dtf-worker` version.
    pub version: String,
    /// `None` when the worker maps the coordinator's paths.
    pub path_mapping: Option<String>,
}

/// Version 3's status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The worker's name.
    pub name: String,
    /// The `dtf-worker` version.
    pub version: String,
    /// The protocol version.
    pub protocol: u32,
    /// Tests it runs at once.
    pub slots: u32,
    /// Coordinators connected now.
    pub connections: u32,
    /// Tests running now.
    pub running: Vec<current::RunningTest>,
    /// Run requests waiting for a slot.
    pub waiting: u32,
    /// Tests run since start.
    pub tests_run: u64,
    /// Binaries in the cache.
    pub cache_entries: u64,
    /// Bytes in the cache.
    pub cache_bytes: u64,
    /// The cache's cap in bytes.
    pub cache_max: u64,
    /// Cache hits.
    pub cache_hits: u64,
    /// Cache misses.
    pub cache_misses: u64,
    /// Binary bytes received.
    pub bytes_received: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
}

/// The version 3 service, call for call.
#[tarpc::service]
pub trait Worker {
    /// Introduces the coordinator.
    async fn hello(hello: Hello) -> WorkerInfo;
    /// Which of these blobs the worker lacks.
    async fn missing(digests: Vec<Digest>) -> Vec<Digest>;
    /// Stores one chunk of a blob.
    async fn upload(chunk: Chunk) -> Result<UploadProgress, UploadError>;
    /// Runs one test.
    async fn run(request: RunRequest) -> RunResponse;
    /// Builds an input tree.
    async fn prepare_inputs(manifest: Digest) -> Result<InputsReady, String>;
    /// Output files of the connection's tests.
    async fn outputs(manifest: Digest) -> Vec<crate::inputs::OutputFile>;
    /// A piece of an output file.
    async fn download(digest: Digest, offset: u64) -> Result<Download, String>;
    /// Liveness.
    async fn ping() -> u64;
    /// The worker's state.
    async fn status() -> WorkerStatus;
}

/// A version 3 coordinator's transport.
pub type ClientTransport<S> = Framed<
    SecureStream<S>,
    FrameCodec<tarpc::Response<WorkerResponse>, tarpc::ClientMessage<WorkerRequest>>,
>;

/// Connects to `addr` as a version 3 coordinator would: handshake, then hello. For tests of
/// the compatibility rule.
pub async fn connect(
    addr: &str,
    token: Option<&Token>,
    hello: Hello,
    limit: Duration,
) -> Result<(WorkerClient, WorkerInfo), ConnectError> {
    let stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::ConnectTimeout {
            addr: addr.to_owned(),
            after: limit,
        })?
        .map_err(|error| ConnectError::Connect {
            addr: addr.to_owned(),
            error,
        })?;
    let handshake = |error| ConnectError::Handshake {
        addr: addr.to_owned(),
        error,
    };
    let stream = tokio::time::timeout(
        limit,
        super::transport::client_handshake_as(stream, token, VERSION),
    )
    .await
    .map_err(|_| handshake(super::HandshakeError::Timeout(limit)))?
    .map_err(handshake)?;
    let transport: ClientTransport<_> = Framed::new(stream, FrameCodec::new(MAX_FRAME));
    let client = WorkerClient::new(tarpc::client::Config::default(), transport).spawn();
    let info = client
        .hello(super::context_within(limit), hello)
        .await
        .map_err(|error| ConnectError::Rpc {
            addr: addr.to_owned(),
            error,
        })?;
    Ok((client, info))
}

/// A version 3 request as the current service takes it (`None`: nothing to serve).
pub fn request_from_v3(
    message: tarpc::ClientMessage<WorkerRequest>,
) -> Option<tarpc::ClientMessage<current::WorkerRequest>> {
    use current::WorkerRequest as Now;
    let request = match message {
        tarpc::ClientMessage::Request(request) => request,
        tarpc::ClientMessage::Cancel {
            trace_context,
            request_id,
        } => {
            return Some(tarpc::ClientMessage::Cancel {
                trace_context,
                request_id,
            });
        }
        _ => return None,
    };
    let message = match request.message {
        WorkerRequest::Hello { hello } => Now::Hello {
            hello: current::Hello {
                run: hello.run,
                key: None,
            },
        },
        WorkerRequest::Missing { digests } => Now::Missing { digests },
        WorkerRequest::Upload { chunk } => Now::Upload { chunk },
        WorkerRequest::Run { request } => Now::Run { request },
        WorkerRequest::PrepareInputs { manifest } => Now::PrepareInputs { manifest },
        WorkerRequest::Outputs { manifest } => Now::Outputs { manifest },
        WorkerRequest::Download { digest, offset } => Now::Download { digest, offset },
        WorkerRequest::Ping {} => Now::Ping {},
        WorkerRequest::Status {} => Now::Status {},
    };
    Some(tarpc::ClientMessage::Request(tarpc::Request {
        context: request.context,
        id: request.id,
        message,
    }))
}

/// A current response as a version 3 coordinator reads it.
pub fn response_to_v3(
    response: tarpc::Response<current::WorkerResponse>,
) -> tarpc::Response<WorkerResponse> {
    use current::WorkerResponse as Now;
    let message = response.message.and_then(|message| {
        Ok(match message {
            Now::Hello(info) => WorkerResponse::Hello(WorkerInfo {
                name: info.name,
                slots: info.slots,
                version: info.version,
                path_mapping: info.path_mapping,
            }),
            Now::Missing(m) => WorkerResponse::Missing(m),
            Now::Upload(u) => WorkerResponse::Upload(u),
            Now::Run(Ok(r)) => WorkerResponse::Run(r),
            // Version 3 retries an infrastructure failure elsewhere.
            Now::Run(Err(declined)) => WorkerResponse::Run(RunResponse {
                failure: Some(Failure::System {
                    message: format!("not run: {declined}"),
                }),
                duration: Duration::ZERO,
                output: Default::default(),
                leaked: Vec::new(),
                worker: String::new(),
            }),
            Now::PrepareInputs(p) => WorkerResponse::PrepareInputs(p),
            Now::Outputs(o) => WorkerResponse::Outputs(o),
            Now::Download(d) => WorkerResponse::Download(d),
            Now::Ping(beat) => WorkerResponse::Ping(beat.uptime_ms),
            Now::Status(s) => WorkerResponse::Status(WorkerStatus {
                name: s.name,
                version: s.version,
                protocol: s.protocol,
                slots: s.slots,
                connections: s.connections,
                running: s.running,
                waiting: s.waiting,
                tests_run: s.tests_run,
                cache_entries: s.cache_entries,
                cache_bytes: s.cache_bytes,
                cache_max: s.cache_max,
                cache_hits: s.cache_hits,
                cache_misses: s.cache_misses,
                bytes_received: s.bytes_received,
                uptime_secs: s.uptime_secs,
            }),
            Now::Drain(_) | Now::Finish(_) => {
                return Err(tarpc::ServerError::new(
                    std::io::ErrorKind::Unsupported,
                    "not a version 3 call".to_owned(),
                ));
            }
        })
    });
    tarpc::Response {
        request_id: response.request_id,
        message,
    }
}

/// The worker's transport for a version 3 connection: version 3 frames, translated to and
/// from the current service.
pub fn server_transport<S: AsyncRead + AsyncWrite + Unpin>(
    stream: SecureStream<S>,
) -> impl tarpc::Transport<
    tarpc::Response<current::WorkerResponse>,
    tarpc::ClientMessage<current::WorkerRequest>,
> + Unpin
+ use<S> {
    use futures::{SinkExt, StreamExt};
    type Codec = FrameCodec<tarpc::ClientMessage<WorkerRequest>, tarpc::Response<WorkerResponse>>;
    let framed: Framed<SecureStream<S>, Codec> =
        Framed::new(stream, FrameCodec::new(MAX_REQUEST_FRAME));
    framed
        .with(|response| futures::future::ready(Ok::<_, std::io::Error>(response_to_v3(response))))
        .filter_map(|item| {
            futures::future::ready(match item {
                Ok(message) => request_from_v3(message).map(Ok),
                Err(e) => Some(Err(e)),
            })
        })
}
