//! How messages travel: a version greeting, a Noise handshake (through `snow`), an encrypted
//! record layer, and length-prefixed postcard frames on top.
//!
//! # The connection, byte by byte
//!
//! 1. The coordinator sends `MAGIC | version (u32) | mode (u8) | len (u16) | Noise message 1`.
//!    `mode` says whether it holds a token. Noise message 1 is
//!    `Noise_NNpsk0_25519_ChaChaPoly_SHA256` with the token's key as the pre-shared key (or
//!    `Noise_NN_25519_ChaChaPoly_SHA256` for a worker that checks no token): an ephemeral
//!    public key and an empty payload whose authentication tag only a holder of the token can
//!    produce. The greeting's first 13 bytes are the handshake's prologue, so they cannot be
//!    altered unnoticed.
//! 2. The worker checks the magic and the version first (a version it does not speak is
//!    answered `MAGIC | newest (u32) | VERSION | oldest (u32)` and the connection ends). It then
//!    checks message 1: a wrong token is answered with one constant byte, `REJECTED`, and the
//!    connection ends. **Nothing the worker sends before this point depends on the token**, so
//!    an unauthenticated connection learns nothing to test guesses against.
//! 3. Only after message 1 proved the token does the worker answer
//!    `MAGIC | version | ACCEPTED | len (u16) | Noise message 2` (its own ephemeral key; both
//!    sides now share keys from an ephemeral Diffie-Hellman mixed with the token). The
//!    coordinator checks message 2, which proves the worker holds the token too.
//! 4. Everything after that is Noise transport messages (`len (u16) | ciphertext`, each at
//!    most 64 KiB, ChaCha20-Poly1305 with snow's counter nonces): nobody on the path can read,
//!    inject, alter, replay, reorder or drop records without the connection ending, and a
//!    token stolen later does not decrypt recorded traffic (the keys came from ephemeral keys
//!    that are gone).
//! 5. Inside the records, frames are `len (u32) | postcard` holding tarpc messages, at most
//!    the receiving side's frame limit ([`MAX_FRAME`] for responses, [`MAX_REQUEST_FRAME`] for
//!    requests). A frame's memory grows with the bytes that actually arrived, not with its
//!    announced length.

use std::io;
use std::marker::PhantomData;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed};

use super::messages::{WorkerRequest, WorkerResponse};
use super::token::Token;

/// The protocol version this build speaks when it connects.
pub const PROTOCOL_VERSION: u32 = 4;

/// The oldest version any worker serves: 3, the first with the reviewed handshake.
pub const OLDEST_SERVED: u32 = 3;

/// The versions a worker of this build accepts: its own and the one before it (so workers can
/// be upgraded first, while coordinators of the previous release still run), never one older
/// than [`OLDEST_SERVED`]. The worker branches on [`SecureStream::version`].
pub const ACCEPTED_VERSIONS: RangeInclusive<u32> = accepted_versions(PROTOCOL_VERSION);

/// The versions a worker speaking `version` accepts: `version` and `version - 1`, but none
/// older than [`OLDEST_SERVED`].
pub const fn accepted_versions(version: u32) -> RangeInclusive<u32> {
    let previous = version.saturating_sub(1);
    let oldest = if previous < OLDEST_SERVED {
        OLDEST_SERVED
    } else {
        previous
    };
    if oldest > version {
        version..=version
    } else {
        oldest..=version
    }
}

/// The first bytes of every connection, in both directions.
pub const MAGIC: [u8; 8] = *b"DTF\0WRKR";

/// The largest frame a coordinator accepts (a response: a test's captured output travels in
/// one). A larger length prefix ends the connection.
pub const MAX_FRAME: usize = 8 << 20;

/// The largest frame a worker accepts (a request: an upload chunk of
/// [`super::CHUNK_SIZE`] or a test's command line and environment).
pub const MAX_REQUEST_FRAME: usize = 2 << 20;

/// The most bytes a worker holds in partial request frames over all its connections. A frame
/// that would take the total past it ends its connection (the coordinator sees the connection
/// close); one connection alone holds at most [`MAX_REQUEST_FRAME`].
pub const PARTIAL_FRAME_BUDGET: usize = 64 << 20;

/// Bytes held in partial request frames by this process's worker-side codecs.
static PARTIAL_FRAME_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes this process holds in partial request frames right now (a worker's memory bound).
pub fn partial_frame_bytes() -> usize {
    PARTIAL_FRAME_BYTES.load(Ordering::Relaxed)
}

/// The furthest deadline a request may carry. tarpc turns the relative deadline on the wire
/// into `Instant::now() + deadline`, which panics on overflow: a deadline of `u64::MAX` seconds
/// would crash the worker inside tarpc's deserialisation.
pub const MAX_DEADLINE: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// Checks the deadline of a request frame (postcard of `tarpc::ClientMessage`) before it is
/// decoded: a deadline more than [`MAX_DEADLINE`] away is refused. Frames that are not
/// requests, or too short to say, are left for the decoder to judge.
pub fn check_request_deadline(frame: &[u8]) -> Result<(), String> {
    fn varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let (&byte, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut rest = frame;
    // `ClientMessage::Request` is variant 0; its first field is the context, whose first is
    // the deadline: a `Duration` as `secs (varint u64) | nanos (varint u32)`.
    if varint(&mut rest) != Some(0) {
        return Ok(());
    }
    match varint(&mut rest) {
        Some(secs) if secs > MAX_DEADLINE.as_secs() => Err(format!(
            "a request's deadline is {secs} s away, more than a year (at most {} s)",
            MAX_DEADLINE.as_secs()
        )),
        _ => Ok(()),
    }
}

/// A frame buffer holding more than this after a frame is replaced by a small one, so a large
/// frame's memory goes back once it is decoded.
const KEEP_BUFFER: usize = 64 << 10;

/// The largest Noise handshake message either side accepts (ours are 48 bytes).
const MAX_HANDSHAKE_MESSAGE: usize = 1024;

const PATTERN_TOKEN: &str = "Noise_NNpsk0_25519_ChaChaPoly_SHA256";
const PATTERN_OPEN: &str = "Noise_NN_25519_ChaChaPoly_SHA256";

const MODE_OPEN: u8 = 0;
const MODE_TOKEN: u8 = 1;

const ACCEPTED: u8 = 0;
const VERSION: u8 = 1;
const TOKEN_REQUIRED: u8 = 2;
const NO_TOKEN_HERE: u8 = 3;
const REJECTED: u8 = 4;

/// Noise's largest message, and the plaintext one record carries.
const MAX_RECORD: usize = 65535;
const TAG_LEN: usize = 16;
const MAX_PLAIN: usize = MAX_RECORD - TAG_LEN;

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
        "protocol version mismatch: the {peer_role} speaks dtf protocol {}, this {our_role} speaks version {ours}; a worker serves coordinators of its own protocol version and the one before it (from version 3 on): upgrade the workers first, then the coordinators",
        versions(peer)
    )]
    VersionMismatch {
        /// "worker" or "coordinator".
        peer_role: &'static str,
        /// "worker" or "coordinator".
        our_role: &'static str,
        /// The versions the peer speaks.
        peer: RangeInclusive<u32>,
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
    /// The coordinator connected without a token to a worker that checks one.
    #[error("the coordinator has no token and this worker requires one")]
    NoToken,
    /// The coordinator has a token and this worker checks none.
    #[error("the coordinator has a token and this worker checks none")]
    UnexpectedToken,
    /// A handshake message was malformed.
    #[error("malformed handshake: {0}")]
    Malformed(String),
    /// The handshake took too long.
    #[error("the handshake timed out after {0:?}")]
    Timeout(Duration),
}

fn versions(range: &RangeInclusive<u32>) -> String {
    if range.start() == range.end() {
        format!("version {}", range.start())
    } else {
        format!("versions {} to {}", range.start(), range.end())
    }
}

impl HandshakeError {
    /// A short, fixed name for the failure, for counting refusals by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Io(_) => "closed",
            HandshakeError::NotDtf => "not dtf",
            HandshakeError::VersionMismatch { .. } => "version",
            HandshakeError::TokenRequired | HandshakeError::NoToken => "no token",
            HandshakeError::WorkerUnauthenticated | HandshakeError::UnexpectedToken => {
                "unexpected token"
            }
            HandshakeError::Rejected | HandshakeError::BadToken => "bad token",
            HandshakeError::WorkerNotAuthentic => "worker not authentic",
            HandshakeError::Malformed(_) => "malformed",
            HandshakeError::Timeout(_) => "timeout",
        }
    }

    /// True when the peer tried a token and it was wrong: the failure that counts toward a
    /// source's back-off.
    pub fn is_failed_authentication(&self) -> bool {
        matches!(self, HandshakeError::BadToken)
    }
}

fn noise_error(e: snow::Error) -> HandshakeError {
    HandshakeError::Malformed(format!("noise: {e}"))
}

fn handshake_state(
    initiator: bool,
    token: Option<&Token>,
    prologue: &[u8],
) -> Result<snow::HandshakeState, HandshakeError> {
    let pattern = if token.is_some() {
        PATTERN_TOKEN
    } else {
        PATTERN_OPEN
    };
    let params: snow::params::NoiseParams = pattern.parse().map_err(noise_error)?;
    let mut builder = snow::Builder::new(params)
        .prologue(prologue)
        .map_err(noise_error)?;
    if let Some(token) = token {
        builder = builder.psk(0, token.psk()).map_err(noise_error)?;
    }
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
    .map_err(noise_error)
}

async fn read_u16_message<S: AsyncRead + Unpin>(io: &mut S) -> Result<Vec<u8>, HandshakeError> {
    let len = io.read_u16().await? as usize;
    if len > MAX_HANDSHAKE_MESSAGE {
        return Err(HandshakeError::Malformed(format!(
            "a handshake message of {len} bytes (at most {MAX_HANDSHAKE_MESSAGE})"
        )));
    }
    let mut message = vec![0u8; len];
    io.read_exact(&mut message).await?;
    Ok(message)
}

/// The coordinator's side of the handshake. `token` must match the worker's; `None` connects
/// only to workers that check no token. Returns the encrypted stream.
pub async fn client_handshake<S>(
    io: S,
    token: Option<&Token>,
) -> Result<SecureStream<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    client_handshake_as(io, token, PROTOCOL_VERSION).await
}

/// [`client_handshake`] saying protocol `ours` (the handshake is the same from version 3 on):
/// for the frozen clients of older versions in [`super::v3`].
pub(crate) async fn client_handshake_as<S>(
    mut io: S,
    token: Option<&Token>,
    ours: u32,
) -> Result<SecureStream<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(15 + 64);
    greeting.extend_from_slice(&MAGIC);
    greeting.extend_from_slice(&ours.to_be_bytes());
    greeting.push(if token.is_some() {
        MODE_TOKEN
    } else {
        MODE_OPEN
    });
    let mut noise = handshake_state(true, token, &greeting)?;
    let mut message = [0u8; MAX_HANDSHAKE_MESSAGE];
    let len = noise
        .write_message(&[], &mut message)
        .map_err(noise_error)?;
    greeting.extend_from_slice(&(len as u16).to_be_bytes());
    greeting.extend_from_slice(&message[..len]);
    io.write_all(&greeting).await?;
    io.flush().await?;

    let mut head = [0u8; 13];
    io.read_exact(&mut head[..12]).await?;
    if head[..8] != MAGIC {
        return Err(HandshakeError::NotDtf);
    }
    let version = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if version != ours {
        // A worker of version 3 or later follows with its verdict and, for this one, the
        // oldest version it accepts; an older worker only says its own.
        let mut oldest = version;
        if version >= 3 && io.read_exact(&mut head[12..]).await.is_ok() && head[12] == VERSION {
            if let Ok(v) = io.read_u32().await {
                oldest = v.min(version);
            }
        }
        return Err(HandshakeError::VersionMismatch {
            peer_role: "worker",
            our_role: "coordinator",
            peer: oldest..=version,
            ours,
        });
    }
    io.read_exact(&mut head[12..]).await?;
    match head[12] {
        ACCEPTED => {}
        VERSION => {
            let oldest = io.read_u32().await.unwrap_or(version);
            return Err(HandshakeError::VersionMismatch {
                peer_role: "worker",
                our_role: "coordinator",
                peer: oldest..=version,
                ours,
            });
        }
        TOKEN_REQUIRED => return Err(HandshakeError::TokenRequired),
        NO_TOKEN_HERE => return Err(HandshakeError::WorkerUnauthenticated),
        REJECTED => return Err(HandshakeError::Rejected),
        other => {
            return Err(HandshakeError::Malformed(format!(
                "unknown verdict {other}"
            )));
        }
    }
    let reply = read_u16_message(&mut io).await?;
    let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
    if noise.read_message(&reply, &mut payload).is_err() {
        return Err(if token.is_some() {
            HandshakeError::WorkerNotAuthentic
        } else {
            HandshakeError::Malformed("the worker's handshake message does not decrypt".into())
        });
    }
    let noise = noise.into_transport_mode().map_err(noise_error)?;
    Ok(SecureStream::new(io, noise, ours))
}

async fn answer<S: AsyncWrite + Unpin>(io: &mut S, version: u32, verdict: u8, rest: &[u8]) {
    let mut reply = Vec::with_capacity(13 + rest.len());
    reply.extend_from_slice(&MAGIC);
    reply.extend_from_slice(&version.to_be_bytes());
    reply.push(verdict);
    reply.extend_from_slice(rest);
    // A peer that left before the answer needs none.
    let _ = io.write_all(&reply).await;
    let _ = io.flush().await;
}

/// The worker's side of the handshake. With a token, the coordinator must prove it holds it
/// before the worker sends anything that depends on the token. Returns the encrypted stream.
pub async fn server_handshake<S>(
    mut io: S,
    token: Option<&Token>,
) -> Result<SecureStream<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 13];
    io.read_exact(&mut greeting[..12]).await?;
    if greeting[..8] != MAGIC {
        return Err(HandshakeError::NotDtf);
    }
    let version = u32::from_be_bytes([greeting[8], greeting[9], greeting[10], greeting[11]]);
    if !ACCEPTED_VERSIONS.contains(&version) {
        answer(
            &mut io,
            *ACCEPTED_VERSIONS.end(),
            VERSION,
            &ACCEPTED_VERSIONS.start().to_be_bytes(),
        )
        .await;
        return Err(HandshakeError::VersionMismatch {
            peer_role: "coordinator",
            our_role: "worker",
            peer: version..=version,
            ours: PROTOCOL_VERSION,
        });
    }
    io.read_exact(&mut greeting[12..]).await?;
    let mode = greeting[12];
    let message = read_u16_message(&mut io).await?;
    match (mode, token) {
        (MODE_TOKEN, Some(_)) | (MODE_OPEN, None) => {}
        (MODE_OPEN, Some(_)) => {
            answer(&mut io, version, TOKEN_REQUIRED, &[]).await;
            return Err(HandshakeError::NoToken);
        }
        (MODE_TOKEN, None) => {
            answer(&mut io, version, NO_TOKEN_HERE, &[]).await;
            return Err(HandshakeError::UnexpectedToken);
        }
        (other, _) => {
            return Err(HandshakeError::Malformed(format!("unknown mode {other}")));
        }
    }
    let mut noise = handshake_state(false, token, &greeting)?;
    let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
    if noise.read_message(&message, &mut payload).is_err() {
        // One constant byte: nothing here depends on the token.
        answer(&mut io, version, REJECTED, &[]).await;
        return Err(if token.is_some() {
            HandshakeError::BadToken
        } else {
            HandshakeError::Malformed("the coordinator's handshake message is invalid".into())
        });
    }
    let mut reply = [0u8; MAX_HANDSHAKE_MESSAGE];
    let len = noise.write_message(&[], &mut reply).map_err(noise_error)?;
    let mut rest = Vec::with_capacity(2 + len);
    rest.extend_from_slice(&(len as u16).to_be_bytes());
    rest.extend_from_slice(&reply[..len]);
    answer(&mut io, version, ACCEPTED, &rest).await;
    let noise = noise.into_transport_mode().map_err(noise_error)?;
    Ok(SecureStream::new(io, noise, version))
}

/// An encrypted, authenticated byte stream over `S`: what the handshake returns. Writes are
/// sealed into Noise transport messages of at most 64 KiB; reads open them and fail (ending
/// the connection) on the first record that does not authenticate.
pub struct SecureStream<S> {
    io: S,
    noise: Box<snow::TransportState>,
    version: u32,
    /// Ciphertext of the record being read: its 2-byte length, then the record.
    incoming: Vec<u8>,
    filled: usize,
    /// Plaintext not yet handed to the reader.
    plain: Vec<u8>,
    plain_pos: usize,
    /// A sealed record not yet fully written.
    outgoing: Vec<u8>,
    out_pos: usize,
    failed: bool,
}

impl<S> std::fmt::Debug for SecureStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn bad_record() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a record does not authenticate (forged, altered, replayed or out of order)",
    )
}

impl<S> SecureStream<S> {
    fn new(io: S, noise: snow::TransportState, version: u32) -> SecureStream<S> {
        SecureStream {
            io,
            noise: Box::new(noise),
            version,
            incoming: vec![0u8; 2 + MAX_RECORD],
            filled: 0,
            plain: vec![0u8; MAX_RECORD],
            plain_pos: MAX_RECORD,
            outgoing: Vec::with_capacity(2 + MAX_RECORD),
            out_pos: 0,
            failed: false,
        }
    }

    /// The protocol version agreed in the handshake.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncWrite + Unpin> SecureStream<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.outgoing.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SecureStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.failed {
                return Poll::Ready(Err(bad_record()));
            }
            let pending = &this.plain[this.plain_pos..];
            if !pending.is_empty() {
                let n = pending.len().min(buf.remaining());
                buf.put_slice(&pending[..n]);
                this.plain_pos += n;
                return Poll::Ready(Ok(()));
            }
            let need = if this.filled < 2 {
                2
            } else {
                2 + u16::from_be_bytes([this.incoming[0], this.incoming[1]]) as usize
            };
            if this.filled >= 2 && this.filled == need {
                this.filled = 0;
                match this
                    .noise
                    .read_message(&this.incoming[2..need], &mut this.plain)
                {
                    Ok(len) => {
                        // The plaintext is the first `len` bytes; serve it from the end.
                        this.plain.copy_within(..len, MAX_RECORD - len);
                        this.plain_pos = MAX_RECORD - len;
                    }
                    Err(_) => {
                        this.failed = true;
                    }
                }
                continue;
            }
            let mut read = ReadBuf::new(&mut this.incoming[this.filled..need]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(if this.filled == 0 {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed in the middle of a record",
                    ))
                });
            }
            this.filled += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SecureStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_PLAIN);
        this.outgoing.resize(2 + n + TAG_LEN, 0);
        let len = this
            .noise
            .write_message(&buf[..n], &mut this.outgoing[2..])
            .map_err(|e| io::Error::other(format!("cannot encrypt a record: {e}")))?;
        this.outgoing.truncate(2 + len);
        this.outgoing[..2].copy_from_slice(&(len as u16).to_be_bytes());
        this.out_pos = 0;
        // Start sending now; what does not fit goes out on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

fn malformed(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The frame codec: `len (u32) | postcard`, decoding `Item`s of at most `max` bytes and
/// encoding `SinkItem`s of at most [`MAX_FRAME`] bytes. A partial frame holds only the bytes
/// that arrived (no allocation up front for its announced length).
pub struct FrameCodec<Item, SinkItem> {
    max: usize,
    /// Count partial frames against [`PARTIAL_FRAME_BUDGET`] (a worker's codecs).
    budgeted: bool,
    /// Bytes of a partial frame this codec counts in [`PARTIAL_FRAME_BYTES`].
    held: usize,
    types: Types<Item, SinkItem>,
}

/// Names the item types without owning any (and without affecting auto traits).
type Types<Item, SinkItem> = PhantomData<(fn() -> Item, fn(SinkItem))>;

impl<Item, SinkItem> FrameCodec<Item, SinkItem> {
    /// A codec that accepts incoming frames of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameCodec {
            max,
            budgeted: false,
            held: 0,
            types: PhantomData,
        }
    }

    /// A worker's codec: its partial frames count against the process's
    /// [`PARTIAL_FRAME_BUDGET`], and a request's deadline is checked
    /// ([`check_request_deadline`]) before tarpc's types see it.
    pub fn worker(max: usize) -> Self {
        FrameCodec {
            budgeted: true,
            ..FrameCodec::new(max)
        }
    }

    /// Counts `now` bytes held in a partial frame (0: none); an error when the process's
    /// budget is exhausted.
    fn hold(&mut self, now: usize) -> Result<(), io::Error> {
        if !self.budgeted || now == self.held {
            return Ok(());
        }
        if now < self.held {
            PARTIAL_FRAME_BYTES.fetch_sub(self.held - now, Ordering::Relaxed);
            self.held = now;
            return Ok(());
        }
        let more = now - self.held;
        let total = PARTIAL_FRAME_BYTES.fetch_add(more, Ordering::Relaxed) + more;
        self.held = now;
        if total > PARTIAL_FRAME_BUDGET {
            self.hold(0)?;
            return Err(malformed(format!(
                "refused a partial frame: the worker already holds {} bytes in partial frames \
                 over all connections, its limit is {PARTIAL_FRAME_BUDGET}",
                total - more
            )));
        }
        Ok(())
    }
}

impl<Item, SinkItem> Drop for FrameCodec<Item, SinkItem> {
    fn drop(&mut self) {
        let _ = self.hold(0);
    }
}

impl<Item: DeserializeOwned, SinkItem> Decoder for FrameCodec<Item, SinkItem> {
    type Item = Item;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Item>, io::Error> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max {
            return Err(malformed(format!(
                "malformed frame: {len} bytes announced, over the limit of {} bytes",
                self.max
            )));
        }
        if src.len() < 4 + len {
            self.hold(src.len())?;
            return Ok(None);
        }
        self.hold(0)?;
        src.advance(4);
        let frame = src.split_to(len);
        if src.capacity() > KEEP_BUFFER && src.len() <= KEEP_BUFFER {
            // Let the large frame's allocation go once the frame is decoded.
            let rest = src.split();
            *src = BytesMut::with_capacity(KEEP_BUFFER.min(rest.len().max(8 << 10)));
            src.extend_from_slice(&rest);
        }
        if self.budgeted {
            check_request_deadline(&frame)
                .map_err(|e| malformed(format!("malformed frame: {e}")))?;
        }
        match postcard::take_from_bytes(&frame) {
            Ok((item, [])) => Ok(Some(item)),
            Ok((_, rest)) => Err(malformed(format!(
                "malformed frame: {} trailing bytes",
                rest.len()
            ))),
            Err(e) => Err(malformed(format!("malformed frame: {e}"))),
        }
    }
}

impl<Item, SinkItem: Serialize> Encoder<SinkItem> for FrameCodec<Item, SinkItem> {
    type Error = io::Error;

    fn encode(&mut self, item: SinkItem, dst: &mut BytesMut) -> Result<(), io::Error> {
        let bytes = postcard::to_stdvec(&item)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if bytes.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a frame of {} bytes is over the limit of {MAX_FRAME} bytes",
                    bytes.len()
                ),
            ));
        }
        dst.reserve(4 + bytes.len());
        dst.put_u32(bytes.len() as u32);
        dst.put_slice(&bytes);
        Ok(())
    }
}

/// A tarpc transport: frames over an encrypted stream.
pub type Transport<S, Item, SinkItem> = Framed<SecureStream<S>, FrameCodec<Item, SinkItem>>;

/// The transport a coordinator uses.
pub type ClientTransport<S> =
    Transport<S, tarpc::Response<WorkerResponse>, tarpc::ClientMessage<WorkerRequest>>;

/// The transport a worker serves.
pub type ServerTransport<S> =
    Transport<S, tarpc::ClientMessage<WorkerRequest>, tarpc::Response<WorkerResponse>>;

/// The coordinator's transport over a stream that completed [`client_handshake`].
pub fn client_transport<S: AsyncRead + AsyncWrite + Unpin>(
    stream: SecureStream<S>,
) -> ClientTransport<S> {
    Framed::new(stream, FrameCodec::new(MAX_FRAME))
}

/// The worker's transport over a stream that completed [`server_handshake`].
pub fn server_transport<S: AsyncRead + AsyncWrite + Unpin>(
    stream: SecureStream<S>,
) -> ServerTransport<S> {
    Framed::new(stream, FrameCodec::worker(MAX_REQUEST_FRAME))
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, Ordering};

    use tokio::io::DuplexStream;

    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef-test";
    const OTHER: &str = "fedcba9876543210fedcba9876543210-test";

    fn token(text: &str) -> Token {
        Token::new(text, "test").unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    type Side = Result<SecureStream<DuplexStream>, HandshakeError>;

    async fn pair(client: Option<&str>, server: Option<&str>) -> (Side, Side) {
        let (a, b) = tokio::io::duplex(1 << 18);
        let ct = client.map(token);
        let st = server.map(token);
        tokio::join!(
            async move { client_handshake(a, ct.as_ref()).await },
            async move { server_handshake(b, st.as_ref()).await }
        )
    }

    /// What the relay does to the next client-to-server chunk.
    const PASS: u8 = 0;
    const FLIP: u8 = 1;
    const REPEAT: u8 = 2;

    /// A client and a server connected through a relay that records both directions and can
    /// alter or repeat what the client sends.
    struct Relayed {
        client: Side,
        server: Side,
        action: Arc<AtomicU8>,
        seen: tokio::task::JoinHandle<Vec<u8>>,
    }

    async fn relayed(client: Option<&str>, server: Option<&str>) -> Relayed {
        let (client_end, relay_a) = tokio::io::duplex(1 << 18);
        let (relay_b, server_end) = tokio::io::duplex(1 << 18);
        let action = Arc::new(AtomicU8::new(PASS));
        let act = action.clone();
        let seen = tokio::spawn(async move {
            let (mut ar, mut aw) = tokio::io::split(relay_a);
            let (mut br, mut bw) = tokio::io::split(relay_b);
            let up = async {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 1 << 18];
                while let Ok(n) = ar.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    match act.swap(PASS, Ordering::SeqCst) {
                        FLIP => buf[n - 1] ^= 1,
                        REPEAT => {
                            let _ = bw.write_all(&buf[..n]).await;
                        }
                        _ => {}
                    }
                    if bw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = bw.shutdown().await;
                seen
            };
            let down = async {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 1 << 18];
                while let Ok(n) = br.read(&mut buf).await {
                    if n == 0 || aw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let _ = aw.shutdown().await;
                seen
            };
            let (mut up, down) = tokio::join!(up, down);
            up.extend(down);
            up
        });
        let ct = client.map(token);
        let st = server.map(token);
        let (client, server) = tokio::join!(
            client_handshake(client_end, ct.as_ref()),
            server_handshake(server_end, st.as_ref())
        );
        Relayed {
            client,
            server,
            action,
            seen,
        }
    }

    #[test]
    fn matching_tokens_authenticate_both_ways_and_agree_on_the_version() {
        let (c, s) = block_on(pair(Some(TOKEN), Some(&format!("{TOKEN}\n"))));
        let (c, s) = (c.unwrap(), s.unwrap());
        assert_eq!(
            (c.version(), s.version()),
            (PROTOCOL_VERSION, PROTOCOL_VERSION)
        );
        let (c, s) = block_on(pair(None, None));
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    }

    #[test]
    fn records_are_encrypted_and_neither_the_token_nor_the_text_is_on_the_wire() {
        let seen = block_on(async {
            let r = relayed(Some(TOKEN), Some(TOKEN)).await;
            let (mut c, mut s) = (r.client.unwrap(), r.server.unwrap());
            // More than one record's worth, to cross record boundaries.
            let text = b"hello, worker ".repeat(10_000);
            c.write_all(&text).await.unwrap();
            c.flush().await.unwrap();
            let mut got = vec![0u8; text.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, text);
            s.write_all(b"and back").await.unwrap();
            s.flush().await.unwrap();
            let mut back = [0u8; 8];
            c.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"and back");
            drop((c, s));
            r.seen.await.unwrap()
        });
        let key = token(TOKEN);
        for needle in [
            TOKEN.as_bytes(),
            &key.psk()[..],
            b"hello, worker",
            b"and back",
        ] {
            assert!(!seen.windows(needle.len()).any(|w| w == needle));
        }
    }

    #[test]
    fn altered_and_replayed_records_end_the_connection() {
        for action in [FLIP, REPEAT] {
            block_on(async {
                let r = relayed(Some(TOKEN), Some(TOKEN)).await;
                let (mut c, mut s) = (r.client.unwrap(), r.server.unwrap());
                c.write_all(b"first").await.unwrap();
                c.flush().await.unwrap();
                let mut got = [0u8; 5];
                s.read_exact(&mut got).await.unwrap();
                r.action.store(action, Ordering::SeqCst);
                c.write_all(b"second").await.unwrap();
                c.flush().await.unwrap();
                let mut got = [0u8; 12];
                let err = s.read_exact(&mut got).await.unwrap_err();
                assert!(err.to_string().contains("does not authenticate"), "{err}");
            });
        }
    }

    #[test]
    fn a_wrong_token_fails_on_both_sides_and_the_worker_answers_one_constant_byte() {
        let (seen, c, s) = block_on(async {
            let r = relayed(Some(OTHER), Some(TOKEN)).await;
            let (c, s) = (r.client, r.server);
            let c = c.map(|_| ()).unwrap_err();
            let s = s.map(|_| ()).unwrap_err();
            (r.seen.await.unwrap(), c, s)
        });
        assert!(matches!(c, HandshakeError::Rejected), "{c:?}");
        assert!(matches!(s, HandshakeError::BadToken), "{s:?}");
        assert!(s.is_failed_authentication());
        // Everything the worker sent: magic, version, the verdict. Nothing that depends on the
        // token.
        let mut expected = MAGIC.to_vec();
        expected.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        expected.push(REJECTED);
        assert!(seen.ends_with(&expected), "{seen:?}");
        assert_eq!(seen.len(), 15 + 48 + expected.len());

        let (c, s) = block_on(pair(None, Some(TOKEN)));
        assert!(matches!(c, Err(HandshakeError::TokenRequired)), "{c:?}");
        assert!(matches!(s, Err(HandshakeError::NoToken)), "{s:?}");
        let (c, s) = block_on(pair(Some(TOKEN), None));
        assert!(
            matches!(c, Err(HandshakeError::WorkerUnauthenticated)),
            "{c:?}"
        );
        assert!(matches!(s, Err(HandshakeError::UnexpectedToken)), "{s:?}");
    }

    #[test]
    fn a_worker_pretending_to_hold_the_token_is_caught() {
        block_on(async {
            let (a, mut b) = tokio::io::duplex(4096);
            let fake = async move {
                let mut greeting = [0u8; 15 + 48];
                b.read_exact(&mut greeting).await.unwrap();
                // It accepts, with a handshake message made without the token.
                let mut noise = handshake_state(false, None, &greeting[..13]).unwrap();
                let mut payload = [0u8; 128];
                noise.read_message(&greeting[15..], &mut payload).unwrap();
                let mut reply = [0u8; 128];
                let len = noise.write_message(&[], &mut reply).unwrap();
                let mut rest = (len as u16).to_be_bytes().to_vec();
                rest.extend_from_slice(&reply[..len]);
                answer(&mut b, PROTOCOL_VERSION, ACCEPTED, &rest).await;
                b
            };
            let t = token(TOKEN);
            let (c, _b) = tokio::join!(client_handshake(a, Some(&t)), fake);
            assert!(
                matches!(c, Err(HandshakeError::WorkerNotAuthentic)),
                "{c:?}"
            );
        });
    }

    #[test]
    fn versions_are_named_on_both_sides() {
        block_on(async {
            // A coordinator of version 99 meets this worker.
            let (mut a, b) = tokio::io::duplex(1024);
            let client = async move {
                let mut hello = MAGIC.to_vec();
                hello.extend_from_slice(&99u32.to_be_bytes());
                a.write_all(&hello).await.unwrap();
                let mut reply = Vec::new();
                a.read_to_end(&mut reply).await.unwrap();
                reply
            };
            let (reply, server) = tokio::join!(client, server_handshake(b, None));
            let mut expected = MAGIC.to_vec();
            expected.extend_from_slice(&ACCEPTED_VERSIONS.end().to_be_bytes());
            expected.push(VERSION);
            expected.extend_from_slice(&ACCEPTED_VERSIONS.start().to_be_bytes());
            assert_eq!(reply, expected);
            let msg = server.unwrap_err().to_string();
            assert!(
                msg.contains("coordinator speaks dtf protocol version 99")
                    && msg.contains(&format!("worker speaks version {PROTOCOL_VERSION}")),
                "{msg}"
            );

            // This coordinator meets a worker of version 2 (which answers with its own
            // version, a flag, a nonce and a MAC) and one accepting versions 4 to 5.
            for (reply, named) in [
                (
                    [&MAGIC[..], &2u32.to_be_bytes(), &[1u8; 65]].concat(),
                    "version 2,",
                ),
                (
                    [
                        &MAGIC[..],
                        &5u32.to_be_bytes(),
                        &[VERSION],
                        &4u32.to_be_bytes(),
                    ]
                    .concat(),
                    "versions 4 to 5,",
                ),
            ] {
                let (a, mut b) = tokio::io::duplex(1024);
                let worker = async move {
                    let mut greeting = [0u8; 12];
                    b.read_exact(&mut greeting).await.unwrap();
                    b.write_all(&reply).await.unwrap();
                    b
                };
                let (c, _b) = tokio::join!(client_handshake(a, None), worker);
                let msg = c.unwrap_err().to_string();
                assert!(
                    msg.contains(&format!("worker speaks dtf protocol {named}"))
                        && msg.contains(&format!("coordinator speaks version {PROTOCOL_VERSION}")),
                    "{msg}"
                );
            }
        });
    }

    #[test]
    fn a_worker_serves_its_version_and_the_previous_one_but_nothing_before_3() {
        assert_eq!(accepted_versions(4), 3..=4);
        assert_eq!(accepted_versions(5), 4..=5);
        assert_eq!(accepted_versions(3), 3..=3);
        assert_eq!(accepted_versions(2), 2..=2);
        assert_eq!(ACCEPTED_VERSIONS, PROTOCOL_VERSION - 1..=PROTOCOL_VERSION);
        for refused in [0, 1, 2, PROTOCOL_VERSION + 1, 99] {
            assert!(!ACCEPTED_VERSIONS.contains(&refused), "{refused}");
        }
    }

    #[test]
    fn a_client_of_the_previous_version_gets_through_the_handshake() {
        let (c, s) = block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            let t = token(TOKEN);
            let u = token(TOKEN);
            tokio::join!(
                async move { client_handshake_as(a, Some(&t), PROTOCOL_VERSION - 1).await },
                async move { server_handshake(b, Some(&u)).await }
            )
        });
        assert_eq!(c.unwrap().version(), PROTOCOL_VERSION - 1);
        assert_eq!(s.unwrap().version(), PROTOCOL_VERSION - 1);
    }

    #[test]
    fn garbage_is_not_dtf_and_oversized_handshake_messages_are_refused() {
        block_on(async {
            let (mut a, b) = tokio::io::duplex(1024);
            a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let s = server_handshake(b, None).await;
            assert!(matches!(s, Err(HandshakeError::NotDtf)), "{s:?}");

            let (mut a, b) = tokio::io::duplex(1024);
            let mut greeting = MAGIC.to_vec();
            greeting.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
            greeting.push(MODE_OPEN);
            greeting.extend_from_slice(&u16::MAX.to_be_bytes());
            a.write_all(&greeting).await.unwrap();
            let s = server_handshake(b, None).await;
            assert!(matches!(s, Err(HandshakeError::Malformed(_))), "{s:?}");
        });
    }

    #[test]
    fn the_frame_codec_refuses_oversized_and_malformed_frames_without_allocating_ahead() {
        let mut codec: FrameCodec<String, String> = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        codec.encode("hello".to_owned(), &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap().as_deref(), Some("hello"));
        // A partial frame announcing 1000 bytes holds only what arrived.
        let mut buf = BytesMut::from(&[0, 0, 3, 232, 1, 2][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() < 1000, "{}", buf.capacity());
        let mut buf = BytesMut::from(&[0, 0, 4, 1][..]);
        let err = codec.decode(&mut buf).unwrap_err().to_string();
        assert!(err.contains("1025 bytes announced"), "{err}");
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(codec.decode(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 1, b'a', 0][..]);
        let err = codec.decode(&mut buf).unwrap_err().to_string();
        assert!(err.contains("1 trailing bytes"), "{err}");
    }

    #[test]
    fn partial_frames_count_against_the_workers_budget_and_large_buffers_are_released() {
        type Codec = FrameCodec<Vec<u8>, ()>;
        let body = MAX_REQUEST_FRAME - 16;
        let mut holding = Vec::new();
        let mut refused = 0;
        for _ in 0..40 {
            let mut codec = Codec::worker(MAX_REQUEST_FRAME);
            let mut buf = BytesMut::new();
            buf.put_u32(MAX_REQUEST_FRAME as u32);
            buf.extend_from_slice(&vec![0u8; body]);
            match codec.decode(&mut buf) {
                Ok(None) => holding.push((codec, buf)),
                Err(e) => {
                    assert!(e.to_string().contains("bytes in partial frames"), "{e}");
                    refused += 1;
                }
                Ok(Some(_)) => panic!("a partial frame decoded"),
            }
        }
        assert_eq!(holding.len(), PARTIAL_FRAME_BUDGET / (body + 4));
        assert_eq!(refused, 40 - holding.len());
        assert_eq!(partial_frame_bytes(), holding.len() * (body + 4));
        // A coordinator's codec counts nothing.
        let mut free = Codec::new(MAX_REQUEST_FRAME);
        let mut buf = BytesMut::from(&[0, 0, 1, 0, 1][..]);
        assert!(free.decode(&mut buf).unwrap().is_none());
        assert_eq!(partial_frame_bytes(), holding.len() * (body + 4));
        drop(holding);
        assert_eq!(partial_frame_bytes(), 0);

        // A large frame, once decoded, leaves no large buffer behind; its count is released.
        let mut codec = Codec::worker(MAX_REQUEST_FRAME);
        let frame = postcard::to_stdvec(&vec![7u8; 1 << 20]).unwrap();
        let mut buf = BytesMut::with_capacity(4 << 20);
        buf.put_u32(frame.len() as u32);
        buf.extend_from_slice(&frame[..1000]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert_eq!(partial_frame_bytes(), 1004);
        buf.extend_from_slice(&frame[1000..]);
        buf.extend_from_slice(&[0, 0]);
        let item = codec.decode(&mut buf).unwrap().expect("a whole frame");
        assert_eq!(item.len(), 1 << 20);
        assert_eq!(partial_frame_bytes(), 0);
        assert!(buf.capacity() <= KEEP_BUFFER, "{}", buf.capacity());
        assert_eq!(&buf[..], &[0, 0]);
    }
}
