//! The messages coordinators and workers exchange: the [`Worker`] service (one request type
//! per call, one response type each) and the types they carry. How these travel (framing,
//! encryption, the handshake) is [`super::transport`]'s business.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::outcome::{Attempt, Failure, Output};
use crate::sandbox::RunSpec;

/// Binary uploads travel in chunks of at most this many bytes, well under the frame limits.
pub const CHUNK_SIZE: usize = 1 << 20;

/// The most uploads one connection may hold unfinished at once (a worker refuses to start
/// another). An upload that fits in one chunk is never unfinished and does not count.
pub const MAX_PARTIAL_UPLOADS_PER_CONNECTION: usize = 4;

/// The BLAKE3 digest of a test binary: its name in a worker's cache.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| Digest(*h.as_bytes()))
    }

    /// The first 12 hex characters, for messages.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_owned()
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A run's identity across its connections to one worker: 128 random bits the coordinator
/// draws once per run. A coordinator that reconnects says it again, and the worker finds what
/// it holds for the run (pinned blobs, input trees, fork servers) instead of rebuilding it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RunKey(pub [u8; 16]);

impl RunKey {
    /// A fresh random key.
    pub fn random() -> std::io::Result<RunKey> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| std::io::Error::other(format!("no randomness: {e}")))?;
        Ok(RunKey(bytes))
    }

    /// The first 8 hex characters, for logs.
    pub fn short(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunKey({})", self.short())
    }
}

/// What a coordinator says about itself when it connects.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// A label for the run, shown in `dtf-worker status` (e.g. `fixture (pid 42 on host)`).
    pub run: String,
    /// The run's identity across reconnects; `None` (a `status` or `drain` call, or a
    /// coordinator of protocol 3) makes the connection a run of its own.
    pub key: Option<RunKey>,
}

/// What a worker says about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker's name (`--name`, or host name and port).
    pub name: String,
    /// Tests it runs at once.
    pub slots: u32,
    /// The `dtf-worker` version.
    pub version: String,
    /// `None` when the worker maps the coordinator's paths for each test (a private mount
    /// namespace); else why it cannot, and its tests run from copies at other paths.
    pub path_mapping: Option<String>,
    /// The worker is draining (it takes no new tests and exits when its running tests end):
    /// a coordinator does not use it, and tries again later.
    pub draining: bool,
}

/// A heartbeat's answer.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Beat {
    /// Milliseconds since the worker started.
    pub uptime_ms: u64,
    /// The worker is draining: send it nothing more (what is queued there comes back declined).
    pub draining: bool,
}

/// Why a worker did not run a test it was sent. The test did not start: the coordinator runs
/// it elsewhere, and it does not count as an attempt.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum Declined {
    /// The worker is draining: it finishes what runs and takes nothing new.
    #[error("the worker is draining")]
    Draining,
}

/// What `drain` started.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct DrainStarted {
    /// False when the worker was already draining.
    pub started: bool,
    /// Tests still running, which it lets finish.
    pub running: u32,
    /// How long it lets them run before killing what is left, in seconds.
    pub timeout_secs: u64,
}

/// One piece of a binary upload. Chunks of one upload arrive in order, starting at offset 0.
#[derive(Clone, Serialize, Deserialize)]
pub struct Chunk {
    /// The digest the whole binary must have.
    pub digest: Digest,
    /// The binary's total size in bytes.
    pub total: u64,
    /// Where this chunk starts.
    pub offset: u64,
    /// The bytes (at most [`CHUNK_SIZE`]).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("digest", &self.digest)
            .field("total", &self.total)
            .field("offset", &self.offset)
            .field("len", &self.data.len())
            .finish()
    }
}

/// How an upload stands after a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadProgress {
    /// More chunks are expected; this many bytes were received so far.
    Partial(u64),
    /// The binary is complete, verified and ready to run.
    Stored,
}

/// Why a worker refused a chunk. The upload is abandoned; nothing is cached.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum UploadError {
    /// The bytes did not hash to the announced digest.
    #[error("digest mismatch: announced {expected}, received bytes hash to {actual}")]
    DigestMismatch {
        /// The announced digest (hex).
        expected: String,
        /// The digest of what arrived (hex).
        actual: String,
    },
    /// A chunk did not continue the upload where the previous one ended.
    #[error("chunk at offset {got} does not continue the upload (expected offset {expected})")]
    OutOfOrder {
        /// The offset the worker expected.
        expected: u64,
        /// The chunk's offset.
        got: u64,
    },
    /// The chunk or the binary is too large.
    #[error("{0}")]
    TooLarge(String),
    /// The worker could not store the binary.
    #[error("the worker cannot store the binary: {0}")]
    Storage(String),
}

/// Runs one test of a cached binary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRequest {
    /// The binary, by digest (uploaded or found in the cache first).
    pub digest: Digest,
    /// The input tree the test sees at the coordinator's paths, by its manifest's digest
    /// (prepared first with `prepare_inputs`).
    pub inputs: Option<Digest>,
    /// The test, its environment, isolation level, timeout and memory limit. The worker always
    /// captures output; `cwd` falls back to the test's temporary directory when missing there.
    pub spec: RunSpec,
}

/// The outcome of one test on a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResponse {
    /// `None` when the test passed. [`Failure::System`] marks an infrastructure failure
    /// (sandbox set-up failed, binary missing): the coordinator runs such tests elsewhere.
    #[serde(with = "json_failure")]
    pub failure: Option<Failure>,
    /// How long the test process ran.
    pub duration: Duration,
    /// Captured stdout and stderr, capped (the cap's note says how much was cut).
    pub output: Output,
    /// The processes the test left running outside its process group (killed).
    pub leaked: Vec<String>,
    /// The worker's name.
    pub worker: String,
}

impl RunResponse {
    /// The response as an attempt run on `worker`.
    pub fn into_attempt(self, worker: String) -> Attempt {
        Attempt {
            failure: self.failure,
            duration: self.duration,
            output: self.output,
            worker: Some(worker),
            kept_tmp: None,
            leaked: self.leaked,
        }
    }
}

/// `Failure` is an internally tagged enum, which postcard cannot decode: it travels as JSON.
mod json_failure {
    use serde::{
        Deserialize, Deserializer, Serialize, Serializer, de::Error as _, ser::Error as _,
    };

    use crate::outcome::Failure;

    pub fn serialize<S: Serializer>(failure: &Option<Failure>, s: S) -> Result<S::Ok, S::Error> {
        serde_json::to_string(failure)
            .map_err(S::Error::custom)?
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Failure>, D::Error> {
        let json = String::deserialize(d)?;
        serde_json::from_str(&json).map_err(D::Error::custom)
    }
}

/// A test running on a worker, as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunningTest {
    /// The test's name.
    pub test: String,
    /// The run it belongs to (the coordinator's label and address).
    pub run: String,
    /// Milliseconds since it started.
    pub running_ms: u64,
}

/// A worker's state, for people (`dtf-worker status ADDR`) and scripts (`--json`).
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
    pub running: Vec<RunningTest>,
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
    /// Binaries asked for that were already cached.
    pub cache_hits: u64,
    /// Binaries asked for that had to be uploaded.
    pub cache_misses: u64,
    /// Binary bytes received by uploads since start.
    pub bytes_received: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// The worker is draining.
    pub draining: bool,
}

/// An input tree built on a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputsReady {
    /// Files in the tree.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
}

/// A piece of a file downloaded from a worker.
#[derive(Clone, Serialize, Deserialize)]
pub struct Download {
    /// The bytes (at most [`CHUNK_SIZE`]; fewer at the end of the file).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for Download {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Download")
            .field("len", &self.data.len())
            .finish()
    }
}

/// The worker service.
#[tarpc::service]
pub trait Worker {
    /// Introduces the coordinator; returns the worker's name, slots and version.
    async fn hello(hello: Hello) -> WorkerInfo;
    /// Which of these binaries the worker lacks. Those it has are kept (never evicted) until
    /// the connection closes.
    async fn missing(digests: Vec<Digest>) -> Vec<Digest>;
    /// Stores one chunk of a binary; the last chunk verifies the digest before the binary
    /// becomes usable.
    async fn upload(chunk: Chunk) -> Result<UploadProgress, UploadError>;
    /// Runs one test in a fresh sandboxed process and returns its outcome, or declines it
    /// (draining) before it starts. Cancelling the request (or closing the connection) kills
    /// the test's process group.
    async fn run(request: RunRequest) -> Result<RunResponse, Declined>;
    /// Builds the input tree whose manifest (uploaded like a binary, with every file it names)
    /// has this digest, once per connection; runs that name it see it at the coordinator's
    /// paths.
    async fn prepare_inputs(manifest: Digest) -> Result<InputsReady, String>;
    /// Files the connection's tests wrote into the tree that match its output patterns.
    async fn outputs(manifest: Digest) -> Vec<crate::inputs::OutputFile>;
    /// A piece of an output file listed by `outputs`, from `offset`.
    async fn download(digest: Digest, offset: u64) -> Result<Download, String>;
    /// Liveness: answers at once, saying whether the worker is draining.
    async fn ping() -> Beat;
    /// The worker's state.
    async fn status() -> WorkerStatus;
    /// Starts draining, as SIGTERM does: no new tests; queued ones are declined; running ones
    /// finish (up to the worker's `--drain-timeout`); then the worker exits.
    async fn drain() -> DrainStarted;
    /// The run is over: the worker releases what it holds for the run when this connection
    /// closes, instead of keeping it for a reconnect.
    async fn finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_survive_postcard_with_failures_inside() {
        let response = RunResponse {
            failure: Some(Failure::Signaled { signal: 9 }),
            duration: Duration::from_millis(5),
            output: Output::default(),
            leaked: vec!["sleep".into()],
            worker: "w".into(),
        };
        let bytes = postcard::to_stdvec(&response).unwrap();
        let back: RunResponse = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.failure, response.failure);
        let digest = Digest::of(b"x");
        assert_eq!(Digest::from_hex(&digest.to_hex()), Some(digest));
    }
}
