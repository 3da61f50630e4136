//! The protocol between a coordinator (a dtf test binary run with `DTF_WORKERS`) and
//! `dtf-worker`: the tarpc service, its message types, the wire codec and the handshake that
//! every connection performs before the first request.
//!
//! # Connection
//!
//! 1. The coordinator opens TCP, sends [`MAGIC`], its [`PROTOCOL_VERSION`] and a random nonce.
//! 2. The worker answers with the same magic, its version, whether it checks a token, its own
//!    nonce and, when it has a token, a MAC proving it holds the token.
//! 3. The coordinator checks the version and the worker's MAC, then sends its own MAC.
//! 4. The worker checks it and answers one byte: welcome or rejected.
//!
//! The MACs are BLAKE3 keyed hashes over both nonces, under a key derived from the shared
//! token, compared in constant time: the token itself never crosses the wire. Only then does
//! the tarpc transport start: length-delimited frames (at most [`MAX_FRAME`] bytes) holding
//! postcard-encoded tarpc messages. On an authenticated connection each frame is sealed with
//! ChaCha20-Poly1305 under a per-connection key ([`Session`]), its direction and sequence
//! number as the nonce, so nobody on the network path can read, inject, alter, replay or drop
//! frames.
//!
//! A version mismatch is detected in step 2 by both sides, and each names both versions.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::outcome::{Attempt, Failure, Output};
use crate::sandbox::RunSpec;

/// The protocol version. Peers of different versions refuse each other with a message that
/// names both.
pub const PROTOCOL_VERSION: u32 = 3;

/// The first bytes of every connection, in both directions.
pub const MAGIC: [u8; 8] = *b"DTF\0WRKR";

/// The largest frame either side accepts (tarpc's default cap, made explicit). A larger length
/// prefix ends the connection.
pub const MAX_FRAME: usize = 8 << 20;

/// Binary uploads travel in chunks of at most this many bytes, well under [`MAX_FRAME`].
pub const CHUNK_SIZE: usize = 1 << 20;

/// The default port of `dtf-worker`.
pub const DEFAULT_PORT: u16 = 7878;

/// The variable holding the shared token.
pub const TOKEN_VAR: &str = "DTF_TOKEN";

/// The variable naming a file that holds the shared token.
pub const TOKEN_FILE_VAR: &str = "DTF_TOKEN_FILE";

const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const KEY_CONTEXT: &str = "dtf-worker 2026 connection token v1";
const SESSION_CONTEXT: &str = "dtf-worker 2026 session keys v1";
const FLAG_AUTH: u8 = 1;
const WELCOME: u8 = 0;
const REJECTED: u8 = 1;

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

/// What a coordinator says about itself when it connects.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// A label for the run, shown in `dtf-worker status` (e.g. `fixture (pid 42 on host)`).
    pub run: String,
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
    /// Runs one test in a fresh sandboxed process and returns its outcome. Cancelling the
    /// request (or closing the connection) kills the test's process group.
    async fn run(request: RunRequest) -> RunResponse;
    /// Liveness: answers at once.
    async fn ping() -> u64;
    /// The worker's state.
    async fn status() -> WorkerStatus;
}

/// The keys of an authenticated connection. Every frame after the handshake is encrypted and
/// authenticated with ChaCha20-Poly1305 under a per-connection key, with its direction and
/// sequence number as the nonce: nobody on the network path can read frames, nor forge, alter,
/// replay, reorder or drop them without the connection ending.
pub struct Session {
    key: LessSafeKey,
    send: u8,
    recv: u8,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Session(..)")
    }
}

const FROM_COORDINATOR: u8 = b'c';
const FROM_WORKER: u8 = b'w';

/// Bytes a sealed frame adds (the Poly1305 tag).
const TAG_LEN: usize = 16;

impl Session {
    fn new(
        token: &Token,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        coordinator: bool,
    ) -> Session {
        let mut material = Vec::with_capacity(32 + 2 * NONCE_LEN);
        material.extend_from_slice(&token.key);
        material.extend_from_slice(client_nonce);
        material.extend_from_slice(server_nonce);
        let (send, recv) = if coordinator {
            (FROM_COORDINATOR, FROM_WORKER)
        } else {
            (FROM_WORKER, FROM_COORDINATOR)
        };
        let key = blake3::derive_key(SESSION_CONTEXT, &material);
        // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
        let key = UnboundKey::new(&CHACHA20_POLY1305, &key)
            .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20-Poly1305 key"));
        Session {
            key: LessSafeKey::new(key),
            send,
            recv,
        }
    }

    /// The nonce of frame `seq` in `direction`: unique for the connection's key.
    fn nonce(direction: u8, seq: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[0] = direction;
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        Nonce::assume_unique_for_key(nonce)
    }

    fn seal(&self, seq: u64, mut frame: Vec<u8>) -> Result<Vec<u8>, io::Error> {
        self.key
            .seal_in_place_append_tag(Self::nonce(self.send, seq), Aad::empty(), &mut frame)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "cannot encrypt a frame"))?;
        Ok(frame)
    }

    fn open(&self, seq: u64, sealed: &[u8]) -> Option<Vec<u8>> {
        let mut frame = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(Self::nonce(self.recv, seq), Aad::empty(), &mut frame)
            .ok()?;
        let len = plain.len();
        frame.truncate(len);
        Some(frame)
    }
}

/// A tokio-serde codec: postcard, encrypted and authenticated frame by frame when the
/// connection is authenticated (see [`Session`]).
pub struct Postcard<Item, SinkItem> {
    session: Option<Session>,
    sent: u64,
    received: u64,
    types: Types<Item, SinkItem>,
}

/// Names the item types without owning any (and without affecting auto traits).
type Types<Item, SinkItem> = PhantomData<(fn() -> Item, fn(SinkItem))>;

impl<Item, SinkItem> Postcard<Item, SinkItem> {
    /// A codec for a connection with these keys (`None`: no token, no MACs).
    pub fn new(session: Option<Session>) -> Self {
        Postcard {
            session,
            sent: 0,
            received: 0,
            types: PhantomData,
        }
    }
}

fn malformed(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<Item: DeserializeOwned, SinkItem> tokio_serde::Deserializer<Item>
    for Postcard<Item, SinkItem>
{
    type Error = io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<Item, io::Error> {
        let this = self.get_mut();
        let opened;
        let mut payload = &src[..];
        if let Some(session) = &this.session {
            if payload.len() < TAG_LEN {
                return Err(malformed(
                    "malformed frame: too short to hold its authentication tag".into(),
                ));
            }
            opened = session.open(this.received, payload).ok_or_else(|| {
                malformed(
                    "malformed frame: it does not authenticate (forged, altered or out of sequence; the MAC check failed)"
                        .into(),
                )
            })?;
            this.received += 1;
            payload = &opened;
        }
        match postcard::take_from_bytes(payload) {
            Ok((item, [])) => Ok(item),
            Ok((_, rest)) => Err(malformed(format!(
                "malformed frame: {} trailing bytes",
                rest.len()
            ))),
            Err(e) => Err(malformed(format!("malformed frame: {e}"))),
        }
    }
}

impl<Item, SinkItem: Serialize> tokio_serde::Serializer<SinkItem> for Postcard<Item, SinkItem> {
    type Error = io::Error;

    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> Result<Bytes, io::Error> {
        let this = self.get_mut();
        let mut bytes =
            postcard::to_stdvec(item).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if let Some(session) = &this.session {
            bytes = session.seal(this.sent, bytes)?;
            this.sent += 1;
        }
        Ok(Bytes::from(bytes))
    }
}

/// A tarpc transport over an authenticated stream.
pub type Transport<S, Item, SinkItem> =
    tarpc::serde_transport::Transport<S, Item, SinkItem, Postcard<Item, SinkItem>>;

/// The transport a coordinator uses.
pub type ClientTransport<S> =
    Transport<S, tarpc::Response<WorkerResponse>, tarpc::ClientMessage<WorkerRequest>>;

/// The transport a worker serves.
pub type ServerTransport<S> =
    Transport<S, tarpc::ClientMessage<WorkerRequest>, tarpc::Response<WorkerResponse>>;

/// Frames `io` (length-delimited, at most [`MAX_FRAME`] bytes) with the postcard codec and,
/// for an authenticated connection, a MAC on every frame.
pub fn transport<S, Item, SinkItem>(io: S, session: Option<Session>) -> Transport<S, Item, SinkItem>
where
    S: AsyncRead + AsyncWrite,
    Item: DeserializeOwned,
    SinkItem: Serialize,
{
    let framed = Framed::new(
        io,
        LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME)
            .new_codec(),
    );
    tarpc::serde_transport::new(framed, Postcard::new(session))
}

/// The shared secret, as a key derived from the token text (the text itself is not kept).
#[derive(Clone)]
pub struct Token {
    key: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// A token that cannot be used.
#[derive(Debug, Error)]
pub enum TokenError {
    /// The token is empty.
    #[error("the token in {source_name} is empty")]
    Empty {
        /// Where it came from.
        source_name: String,
    },
    /// The token file cannot be read.
    #[error("cannot read the token file {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// Why.
        error: io::Error,
    },
}

impl Token {
    /// A token from its text (surrounding whitespace is ignored). `source_name` names where it
    /// came from, for the error message.
    pub fn new(text: &str, source_name: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty {
                source_name: source_name.to_owned(),
            });
        }
        Ok(Token {
            key: blake3::derive_key(KEY_CONTEXT, text.as_bytes()),
        })
    }

    /// A token read from a file.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|error| TokenError::File {
            path: path.display().to_string(),
            error,
        })?;
        Token::new(&text, &path.display().to_string())
    }

    /// The token from `DTF_TOKEN`, else from the file `DTF_TOKEN_FILE` names; `None` when
    /// neither is set.
    pub fn from_env() -> Result<Option<Token>, TokenError> {
        if let Some(text) = std::env::var_os(TOKEN_VAR).filter(|v| !v.is_empty()) {
            return Token::new(&text.to_string_lossy(), TOKEN_VAR).map(Some);
        }
        match std::env::var_os(TOKEN_FILE_VAR).filter(|v| !v.is_empty()) {
            Some(path) => Token::from_file(Path::new(&path)).map(Some),
            None => Ok(None),
        }
    }

    /// A fresh random token's text (64 hex characters).
    pub fn random_text() -> io::Result<String> {
        Ok(blake3::Hash::from_bytes(nonce()?).to_hex().to_string())
    }

    fn mac(&self, role: &[u8], first: &[u8; NONCE_LEN], second: &[u8; NONCE_LEN]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(role);
        hasher.update(&MAGIC);
        hasher.update(&PROTOCOL_VERSION.to_be_bytes());
        hasher.update(first);
        hasher.update(second);
        hasher.finalize()
    }
}

/// Why a connection could not be established.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The connection failed or closed during the handshake.
    #[error("the connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something other than the dtf greeting.
    #[error("the peer does not speak the dtf worker protocol (unexpected greeting)")]
    NotDtf,
    /// The peers speak different protocol versions.
    #[error(
        "protocol version mismatch: the {peer_role} speaks dtf protocol version {peer}, this {our_role} speaks version {ours}; use the same dtf version on both sides"
    )]
    VersionMismatch {
        /// "worker" or "coordinator".
        peer_role: &'static str,
        /// "worker" or "coordinator".
        our_role: &'static str,
        /// The peer's version.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// The worker checks tokens and this side has none.
    #[error("the worker requires a token: set DTF_TOKEN or DTF_TOKEN_FILE")]
    TokenRequired,
    /// This side has a token and the worker does not check tokens.
    #[error(
        "the worker does not check tokens, but a token is set here: start the worker with the token (--token-file or DTF_TOKEN), or unset DTF_TOKEN/DTF_TOKEN_FILE"
    )]
    WorkerUnauthenticated,
    /// The worker rejected this side's proof of the token.
    #[error("the worker rejected the token (authentication failed: the tokens differ)")]
    Rejected,
    /// The worker could not prove it holds the token.
    #[error(
        "the worker failed to prove it holds the token (authentication failed: the tokens differ, or this is not the worker you meant)"
    )]
    WorkerNotAuthentic,
    /// The coordinator did not prove it holds the token.
    #[error("authentication failed: the coordinator's token does not match")]
    BadToken,
    /// The handshake took too long.
    #[error("the handshake timed out after {0:?}")]
    Timeout(Duration),
}

fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(n)
}

/// The coordinator's side of the handshake. `token` must match the worker's; `None` connects
/// only to workers that check no token.
pub async fn client_handshake<S>(
    io: &mut S,
    token: Option<&Token>,
) -> Result<Option<Session>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let client_nonce = nonce()?;
    let mut hello = Vec::with_capacity(8 + 4 + NONCE_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    hello.extend_from_slice(&client_nonce);
    io.write_all(&hello).await?;
    io.flush().await?;

    let mut head = [0u8; 12];
    io.read_exact(&mut head).await?;
    if head[..8] != MAGIC {
        return Err(HandshakeError::NotDtf);
    }
    let version = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch {
            peer_role: "worker",
            our_role: "coordinator",
            peer: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let mut rest = [0u8; 1 + NONCE_LEN + MAC_LEN];
    io.read_exact(&mut rest).await?;
    let auth = rest[0] & FLAG_AUTH != 0;
    let mut server_nonce = [0u8; NONCE_LEN];
    server_nonce.copy_from_slice(&rest[1..1 + NONCE_LEN]);
    let mut server_mac = [0u8; MAC_LEN];
    server_mac.copy_from_slice(&rest[1 + NONCE_LEN..]);

    let proof = match (auth, token) {
        (true, None) => return Err(HandshakeError::TokenRequired),
        (false, Some(_)) => return Err(HandshakeError::WorkerUnauthenticated),
        (false, None) => [0u8; MAC_LEN],
        (true, Some(token)) => {
            // blake3::Hash compares in constant time.
            if token.mac(b"worker", &client_nonce, &server_nonce) != server_mac {
                return Err(HandshakeError::WorkerNotAuthentic);
            }
            *token
                .mac(b"coordinator", &server_nonce, &client_nonce)
                .as_bytes()
        }
    };
    io.write_all(&proof).await?;
    io.flush().await?;
    let mut verdict = [0u8; 1];
    io.read_exact(&mut verdict).await?;
    match verdict[0] {
        WELCOME => Ok(token.map(|t| Session::new(t, &client_nonce, &server_nonce, true))),
        _ => Err(HandshakeError::Rejected),
    }
}

/// The worker's side of the handshake. With a token, the coordinator must prove it holds it.
pub async fn server_handshake<S>(
    io: &mut S,
    token: Option<&Token>,
) -> Result<Option<Session>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = [0u8; 12];
    io.read_exact(&mut head).await?;
    if head[..8] != MAGIC {
        return Err(HandshakeError::NotDtf);
    }
    let version = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    let mut client_nonce = [0u8; NONCE_LEN];
    if version == PROTOCOL_VERSION {
        io.read_exact(&mut client_nonce).await?;
    }
    let server_nonce = nonce()?;
    let mac = match token {
        Some(token) if version == PROTOCOL_VERSION => *token
            .mac(b"worker", &client_nonce, &server_nonce)
            .as_bytes(),
        _ => [0u8; MAC_LEN],
    };
    let mut hello = Vec::with_capacity(12 + 1 + NONCE_LEN + MAC_LEN);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    hello.push(if token.is_some() { FLAG_AUTH } else { 0 });
    hello.extend_from_slice(&server_nonce);
    hello.extend_from_slice(&mac);
    io.write_all(&hello).await?;
    io.flush().await?;
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch {
            peer_role: "coordinator",
            our_role: "worker",
            peer: version,
            ours: PROTOCOL_VERSION,
        });
    }

    let mut proof = [0u8; MAC_LEN];
    io.read_exact(&mut proof).await?;
    let accepted = match token {
        None => true,
        Some(token) => token.mac(b"coordinator", &server_nonce, &client_nonce) == proof,
    };
    io.write_all(&[if accepted { WELCOME } else { REJECTED }])
        .await?;
    io.flush().await?;
    if accepted {
        Ok(token.map(|t| Session::new(t, &client_nonce, &server_nonce, false)))
    } else {
        Err(HandshakeError::BadToken)
    }
}

/// Turns on TCP keepalive (probes after 5 s idle, every 2 s, 3 misses) and disables Nagle's
/// algorithm, so a vanished peer is noticed within seconds even when nothing is being sent.
pub fn configure_socket(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = stream.set_nodelay(true);
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(stream, sockopt::TcpKeepIdle, &5);
    let _ = setsockopt(stream, sockopt::TcpKeepInterval, &2);
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &3);
}

/// Why connecting to a worker failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The address does not resolve.
    #[error("cannot resolve `{addr}`: {error}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        error: io::Error,
    },
    /// TCP failed.
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        error: io::Error,
    },
    /// TCP did not connect in time.
    #[error("cannot connect to {addr}: no answer within {after:?}")]
    ConnectTimeout {
        /// The address.
        addr: String,
        /// The limit.
        after: Duration,
    },
    /// The handshake failed.
    #[error("{addr}: {error}")]
    Handshake {
        /// The address.
        addr: String,
        /// Why.
        error: HandshakeError,
    },
    /// The worker did not answer the first request.
    #[error("{addr}: the worker did not answer: {error}")]
    Rpc {
        /// The address.
        addr: String,
        /// Why.
        error: tarpc::client::RpcError,
    },
}

/// An open, authenticated connection to a worker.
pub struct Connection {
    /// The tarpc client.
    pub client: WorkerClient,
    /// The address connected to.
    pub peer: SocketAddr,
    /// What the worker said about itself.
    pub info: WorkerInfo,
}

/// Connects to `addr` (`host:port`), authenticates with `token` and says hello, each step
/// bounded by `limit`.
pub async fn connect(
    addr: &str,
    token: Option<&Token>,
    hello: Hello,
    limit: Duration,
) -> Result<Connection, ConnectError> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(limit, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| ConnectError::Resolve {
            addr: addr.to_owned(),
            error: io::Error::new(io::ErrorKind::TimedOut, "name lookup timed out"),
        })?
        .map_err(|error| ConnectError::Resolve {
            addr: addr.to_owned(),
            error,
        })?
        .collect();
    let mut last = None;
    for peer in addrs {
        match tokio::time::timeout(limit, TcpStream::connect(peer)).await {
            Ok(Ok(stream)) => return open(stream, peer, addr, token, hello, limit).await,
            Ok(Err(error)) => {
                last = Some(ConnectError::Connect {
                    addr: addr.to_owned(),
                    error,
                })
            }
            Err(_) => {
                last = Some(ConnectError::ConnectTimeout {
                    addr: addr.to_owned(),
                    after: limit,
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::Resolve {
        addr: addr.to_owned(),
        error: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
    }))
}

async fn open(
    mut stream: TcpStream,
    peer: SocketAddr,
    addr: &str,
    token: Option<&Token>,
    hello: Hello,
    limit: Duration,
) -> Result<Connection, ConnectError> {
    configure_socket(&stream);
    let handshake = |error| ConnectError::Handshake {
        addr: addr.to_owned(),
        error,
    };
    let session = tokio::time::timeout(limit, client_handshake(&mut stream, token))
        .await
        .map_err(|_| handshake(HandshakeError::Timeout(limit)))?
        .map_err(handshake)?;
    let client =
        WorkerClient::new(tarpc::client::Config::default(), transport(stream, session)).spawn();
    let info = client
        .hello(context_within(limit), hello)
        .await
        .map_err(|error| ConnectError::Rpc {
            addr: addr.to_owned(),
            error,
        })?;
    Ok(Connection { client, peer, info })
}

/// A request context whose deadline is `limit` from now (tarpc's default is 10 s, measured
/// from when the context is made).
pub fn context_within(limit: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + limit;
    ctx
}

/// Bytes with one decimal in the largest fitting binary unit: `31.2 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{value:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(
        client_token: Option<&str>,
        server_token: Option<&str>,
    ) -> (
        Result<Option<Session>, HandshakeError>,
        Result<Option<Session>, HandshakeError>,
    ) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let ct = client_token.map(|t| Token::new(t, "test").unwrap());
        let st = server_token.map(|t| Token::new(t, "test").unwrap());
        // Each side closes its end when done, as a real connection would.
        tokio::join!(
            async move { client_handshake(&mut a, ct.as_ref()).await },
            async move { server_handshake(&mut b, st.as_ref()).await }
        )
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn matching_tokens_authenticate_both_ways() {
        let (c, s) = block_on(pair(Some("secret"), Some("secret\n")));
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
        let (c, s) = block_on(pair(None, None));
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    }

    #[test]
    fn frames_are_encrypted_and_stop_forgery_and_replay() {
        use tokio_serde::{Deserializer, Serializer};
        let (c, s) = block_on(pair(Some("secret"), Some("secret")));
        let (c, s) = (c.unwrap(), s.unwrap());
        assert!(c.is_some() && s.is_some());
        let mut coordinator: Postcard<u32, String> = Postcard::new(c);
        let mut worker: Postcard<String, u32> = Postcard::new(s);
        let first = Pin::new(&mut coordinator)
            .serialize(&"hello".to_owned())
            .unwrap();
        assert!(
            !first.windows(5).any(|w| w == b"hello"),
            "frames are encrypted: {first:?}"
        );
        let got = Pin::new(&mut worker).deserialize(&BytesMut::from(&first[..]));
        assert_eq!(got.unwrap(), "hello");
        // The same frame again is a replay.
        let replay = Pin::new(&mut worker).deserialize(&BytesMut::from(&first[..]));
        assert!(replay.unwrap_err().to_string().contains("MAC"));
        let second = Pin::new(&mut coordinator)
            .serialize(&"again".to_owned())
            .unwrap();
        let mut altered = BytesMut::from(&second[..]);
        altered[1] ^= 1;
        assert!(Pin::new(&mut worker).deserialize(&altered).is_err());
        let got = Pin::new(&mut worker).deserialize(&BytesMut::from(&second[..]));
        assert_eq!(got.unwrap(), "again");
        // And the other way.
        let answer = Pin::new(&mut worker).serialize(&7).unwrap();
        assert_eq!(
            Pin::new(&mut coordinator)
                .deserialize(&BytesMut::from(&answer[..]))
                .unwrap(),
            7
        );
        // Without a token, frames are plain postcard.
        let (c, _) = block_on(pair(None, None));
        assert!(c.unwrap().is_none());
    }

    #[test]
    fn a_wrong_token_fails_on_both_sides() {
        let (c, s) = block_on(pair(Some("wrong"), Some("secret")));
        assert!(
            matches!(c, Err(HandshakeError::WorkerNotAuthentic)),
            "{c:?}"
        );
        // The coordinator stops before proving anything; the worker sees it leave.
        assert!(s.is_err());
        let (c, _) = block_on(pair(None, Some("secret")));
        assert!(matches!(c, Err(HandshakeError::TokenRequired)), "{c:?}");
        let (c, _) = block_on(pair(Some("secret"), None));
        assert!(
            matches!(c, Err(HandshakeError::WorkerUnauthenticated)),
            "{c:?}"
        );
    }

    #[test]
    fn the_token_never_appears_on_the_wire() {
        const TEXT: &str = "super-secret-token";
        let seen = block_on(async {
            let (mut client_end, relay_a) = tokio::io::duplex(4096);
            let (relay_b, mut server_end) = tokio::io::duplex(4096);
            let relay = tokio::spawn(async move {
                let (mut ar, mut aw) = tokio::io::split(relay_a);
                let (mut br, mut bw) = tokio::io::split(relay_b);
                let up = async {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 512];
                    while let Ok(n) = ar.read(&mut buf).await {
                        if n == 0 || bw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                    }
                    seen
                };
                let down = async {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 512];
                    while let Ok(n) = br.read(&mut buf).await {
                        if n == 0 || aw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                    }
                    seen
                };
                let (mut up, down) = tokio::join!(up, down);
                up.extend(down);
                up
            });
            let token = Token::new(TEXT, "test").unwrap();
            let (c, s) = tokio::join!(
                client_handshake(&mut client_end, Some(&token)),
                server_handshake(&mut server_end, Some(&token))
            );
            assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
            drop(client_end);
            drop(server_end);
            relay.await.unwrap()
        });
        assert_eq!(seen.len(), 2 * (12 + 32) + 1 + 32 + 32 + 1);
        let token = Token::new(TEXT, "test").unwrap();
        for needle in [TEXT.as_bytes(), &token.key[..]] {
            assert!(!seen.windows(needle.len()).any(|w| w == needle));
        }
    }

    #[test]
    fn versions_are_named_on_both_sides() {
        block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1024);
            let client = async move {
                let mut hello = MAGIC.to_vec();
                hello.extend_from_slice(&99u32.to_be_bytes());
                a.write_all(&hello).await.unwrap();
                let mut head = [0u8; 12];
                a.read_exact(&mut head).await.unwrap();
                u32::from_be_bytes([head[8], head[9], head[10], head[11]])
            };
            let (seen, server) = tokio::join!(client, server_handshake(&mut b, None));
            assert_eq!(seen, PROTOCOL_VERSION);
            let msg = server.unwrap_err().to_string();
            assert!(
                msg.contains("version 99") && msg.contains(&format!("version {PROTOCOL_VERSION}")),
                "{msg}"
            );
        });
    }

    #[test]
    fn garbage_is_not_dtf() {
        block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1024);
            a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            assert!(matches!(
                server_handshake(&mut b, None).await,
                Err(HandshakeError::NotDtf)
            ));
        });
    }

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
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(4 << 30), "4.0 GiB");
        let digest = Digest::of(b"x");
        assert_eq!(Digest::from_hex(&digest.to_hex()), Some(digest));
    }
}
