//! A tiny line-echo server with three habits that make its tests collide when they run side by
//! side on one machine:
//!
//! - it listens on a fixed address, [`DEFAULT_ADDR`] (`127.0.0.1:8080`);
//! - it keeps its state in a file at a fixed path, [`STATE_FILE`] under `/tmp`;
//! - [`start_helper`] starts a background process (in a process group of its own, like a
//!   daemon) that nothing ever stops.
//!
//! ```no_run
//! use std::io::{BufRead, BufReader, Write};
//!
//! let server = ports::Server::start(ports::DEFAULT_ADDR)?;
//! let mut conn = std::net::TcpStream::connect(server.addr())?;
//! conn.write_all(b"hello\n")?;
//! let mut line = String::new();
//! BufReader::new(conn).read_line(&mut line)?;
//! assert_eq!(line, "hello\n");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Command, Stdio};

/// Where the server listens unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// Where the server keeps its state.
pub const STATE_FILE: &str = "/tmp/dtf-ports-example/state";

/// The helper [`start_helper`] runs: `sleep` for this many seconds.
pub const HELPER_SECONDS: &str = "8080";

/// A running echo server: every line a client sends comes back. It runs until the process
/// ends.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
}

impl Server {
    /// Binds `addr` and serves every connection on a thread of its own.
    pub fn start(addr: impl ToSocketAddrs) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || echo(conn));
            }
        });
        Ok(Server { addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn echo(conn: TcpStream) -> io::Result<()> {
    let mut writer = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        writer.write_all(line?.as_bytes())?;
        writer.write_all(b"\n")?;
    }
    Ok(())
}

/// Saves the server's state in [`STATE_FILE`].
pub fn save_state(state: &str) -> io::Result<()> {
    let path = Path::new(STATE_FILE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, state)
}

/// Loads the state saved by [`save_state`].
pub fn load_state() -> io::Result<String> {
    std::fs::read_to_string(STATE_FILE)
}

/// Starts the background helper, `sleep 8080` in a process group of its own, and returns at
/// once without waiting for it: like a daemon, it outlives the process that started it.
pub fn start_helper() -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    // `spawn` returns once the helper runs `sleep`; the `Child` is dropped, not waited for.
    Command::new("sleep")
        .arg(HELPER_SECONDS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}
