//! The protocol between a coordinator (a dtf test binary run with `DTF_WORKERS`) and
//! `dtf-worker`, in three parts:
//!
//! - [`messages`]: the tarpc [`Worker`] service and the types its calls carry;
//! - [`transport`]: the version greeting, the Noise handshake that authenticates both sides
//!   with the shared token and agrees on fresh keys, the encrypted record layer and the frame
//!   codec;
//! - [`token`]: loading and checking the shared token;
//! - [`v3`]: the previous protocol version, frozen, which workers still serve.
//!
//! This module ties them together: [`connect`] opens an authenticated connection and says
//! hello. See `docs/security.md` for why the handshake is what it is.

pub mod fuzzing;
pub mod messages;
pub mod token;
pub mod transport;
pub mod v3;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpStream;

pub use messages::*;
pub use token::{HOW_TO_MAKE_A_TOKEN, MIN_TOKEN_LEN, TOKEN_FILE_VAR, TOKEN_VAR, Token, TokenError};
pub use transport::{
    ACCEPTED_VERSIONS, ClientTransport, HandshakeError, MAGIC, MAX_FRAME, MAX_REQUEST_FRAME,
    OLDEST_SERVED, PARTIAL_FRAME_BUDGET, PROTOCOL_VERSION, SecureStream, ServerTransport,
    accepted_versions, client_handshake, client_transport, configure_socket, partial_frame_bytes,
    server_handshake, server_transport,
};

/// The default port of `dtf-worker`.
pub const DEFAULT_PORT: u16 = 7878;

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

impl ConnectError {
    /// True when trying again later may work (the worker is down, restarting, slow or out of
    /// reach); false when it answered and refused (another protocol version, a token that does
    /// not match, not a dtf worker), which retrying cannot change.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Handshake { error, .. } => matches!(
                error,
                HandshakeError::Io(_) | HandshakeError::Timeout(_) | HandshakeError::Malformed(_)
            ),
            _ => true,
        }
    }
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
            Ok(Ok(stream)) => {
                // A worker flooded with idle connections may close ours before reading its
                // greeting (it evicts the idlest): try again, a few times, within the limit.
                let started = std::time::Instant::now();
                let mut stream = stream;
                let mut attempt = 1;
                loop {
                    match open(stream, peer, addr, token, hello.clone(), limit).await {
                        Err(ConnectError::Handshake {
                            error: HandshakeError::Io(_),
                            ..
                        }) if attempt < 4 && started.elapsed() < limit / 2 => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                            match tokio::time::timeout(limit, TcpStream::connect(peer)).await {
                                Ok(Ok(again)) => stream = again,
                                _ => break,
                            }
                        }
                        result => return result,
                    }
                }
                last = Some(ConnectError::ConnectTimeout {
                    addr: addr.to_owned(),
                    after: limit,
                });
            }
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
    stream: TcpStream,
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
    let stream = tokio::time::timeout(limit, client_handshake(stream, token))
        .await
        .map_err(|_| handshake(HandshakeError::Timeout(limit)))?
        .map_err(handshake)?;
    let client =
        WorkerClient::new(tarpc::client::Config::default(), client_transport(stream)).spawn();
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

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(4 << 30), "4.0 GiB");
    }
}
