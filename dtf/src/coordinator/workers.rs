//! Which workers a run uses (`DTF_WORKERS` / `--workers`), connecting to them in parallel and
//! shipping the test binary to those that lack it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::inputs::Tree;
use crate::protocol::{
    self, CHUNK_SIZE, Chunk, Connection, Digest, Hello, Token, UploadProgress, WorkerClient,
};

/// Digests asked about per `missing` call.
const MISSING_BATCH: usize = 4096;

/// Uploads of input files in flight per worker.
const UPLOADS_IN_FLIGHT: usize = 16;

/// How long building the input tree on a worker may take.
const PREPARE_LIMIT: Duration = Duration::from_secs(600);

/// How long connecting (TCP, then handshake and hello) may take per worker.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(3);

/// How long one upload chunk may take.
const CHUNK_LIMIT: Duration = Duration::from_secs(30);

/// Where the tests run, as `DTF_WORKERS` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkersSpec {
    /// `host:port,host:port,...`
    Remote(Vec<String>),
    /// `local:N`: N `dtf-worker` processes on loopback, for the length of the run.
    Local(usize),
}

/// The most workers `local:N` starts.
pub const MAX_LOCAL: usize = 64;

impl WorkersSpec {
    /// Parses `host:port,host:port` or `local:N`. `source` names the flag or variable.
    pub fn parse(value: &str, source: &str) -> Result<WorkersSpec, String> {
        let value = value.trim();
        if let Some(n) = value.strip_prefix("local:") {
            return match n.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_LOCAL).contains(&n) => Ok(WorkersSpec::Local(n)),
                _ => Err(format!(
                    "invalid {source}=`{value}`: local:N needs a number of workers from 1 to {MAX_LOCAL}"
                )),
            };
        }
        let mut addrs = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || {
                format!(
                    "invalid worker address `{entry}` in {source}: expected host:port (such as 10.0.0.5:7878 or [::1]:7878), or local:N"
                )
            };
            let (host, port) = entry.rsplit_once(':').ok_or_else(bad)?;
            let host_ok = !host.is_empty()
                && !host.contains(char::is_whitespace)
                && (host.starts_with('[') == host.ends_with(']'))
                && (host.starts_with('[') || !host.contains(':'));
            if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad());
            }
            if !addrs.iter().any(|a| a == entry) {
                addrs.push(entry.to_owned());
            }
        }
        if addrs.is_empty() {
            return Err(format!(
                "invalid {source}=`{value}`: expected host:port,host:port or local:N"
            ));
        }
        Ok(WorkersSpec::Remote(addrs))
    }
}

/// The test binary, read once, to ship to workers that lack it.
#[derive(Clone)]
pub struct Binary {
    /// Its digest.
    pub digest: Digest,
    /// Its bytes.
    pub bytes: Arc<Vec<u8>>,
}

impl Binary {
    /// Reads and hashes the binary at `path`.
    pub fn read(path: &std::path::Path) -> std::io::Result<Binary> {
        let bytes = std::fs::read(path)?;
        let digest = Digest::of(&bytes);
        Ok(Binary {
            digest,
            bytes: Arc::new(bytes),
        })
    }
}

/// A worker ready to run tests.
pub struct Ready {
    /// How the run names it: the address as given, or the name of a `local:N` worker.
    pub label: String,
    /// The connection.
    pub client: WorkerClient,
    /// Its slots.
    pub slots: usize,
    /// Bytes of binary sent to it (0 when it had the binary cached).
    pub shipped: u64,
    /// Input files sent to it (the tree's manifest not counted).
    pub input_files: u64,
    /// Bytes of input files (and of the manifest) sent to it.
    pub input_bytes: u64,
    /// `None` when it maps the coordinator's paths; else why it cannot.
    pub path_mapping: Option<String>,

    /// How long connecting and shipping took.
    pub setup: Duration,
}

/// Why a worker is left out of a run.
#[derive(Debug)]
pub enum Unusable {
    /// Connecting, authenticating or saying hello failed.
    Unreachable(String),
    /// Connected, but shipping the binary failed.
    Failed(String),
}

/// Connects to `addr`, authenticates, and uploads the binaries the worker lacks.
pub async fn prepare(
    addr: &str,
    label: Option<String>,
    token: Option<&Token>,
    run_label: &str,
    binaries: &[Binary],
    tree: Option<&Tree>,
) -> Result<Ready, Unusable> {
    let started = Instant::now();
    let hello = Hello {
        run: run_label.to_owned(),
    };
    let Connection { client, info, .. } = protocol::connect(addr, token, hello, CONNECT_LIMIT)
        .await
        .map_err(|e| Unusable::Unreachable(e.to_string()))?;
    let mut digests: Vec<Digest> = binaries.iter().map(|b| b.digest).collect();
    digests.dedup();
    let missing = client
        .missing(protocol::context_within(CHUNK_LIMIT), digests)
        .await
        .map_err(|e| Unusable::Failed(format!("{addr}: the worker did not answer: {e}")))?;
    let mut shipped = 0;
    let mut sent = std::collections::HashSet::new();
    for binary in binaries {
        if missing.contains(&binary.digest) && sent.insert(binary.digest) {
            shipped += upload(
                &client,
                addr,
                binary.digest,
                &binary.bytes,
                "the test binary",
            )
            .await
            .map_err(Unusable::Failed)?;
        }
    }
    let (input_files, input_bytes) = match tree {
        Some(tree) => ship_inputs(&client, addr, tree)
            .await
            .map_err(Unusable::Failed)?,
        None => (0, 0),
    };
    Ok(Ready {
        label: label.unwrap_or_else(|| addr.to_owned()),
        client,
        slots: (info.slots as usize).max(1),
        shipped,
        input_files,
        input_bytes,
        path_mapping: info.path_mapping,
        setup: started.elapsed(),
    })
}

/// Ships what the worker lacks of `tree` (its files, then its manifest: find missing, then
/// upload) and has it build the tree. Files and bytes sent.
async fn ship_inputs(client: &WorkerClient, addr: &str, tree: &Tree) -> Result<(u64, u64), String> {
    let mut digests: Vec<Digest> = tree.blobs.keys().copied().collect();
    digests.push(tree.digest);
    let mut missing = Vec::new();
    for batch in digests.chunks(MISSING_BATCH) {
        let answer = client
            .missing(protocol::context_within(CHUNK_LIMIT), batch.to_vec())
            .await
            .map_err(|e| format!("{addr}: the worker did not answer: {e}"))?;
        missing.extend(answer);
    }
    let manifest_missing = missing.contains(&tree.digest);
    let files: Vec<(Digest, std::path::PathBuf)> = missing
        .iter()
        .filter_map(|d| tree.blobs.get(d).map(|(path, _)| (*d, path.clone())))
        .collect();
    let count = files.len() as u64;
    let mut sent = 0u64;
    // Files of more than one chunk stay unfinished on the worker between chunks: at most
    // `MAX_PARTIAL_UPLOADS_PER_CONNECTION` of them at once.
    let large = &tokio::sync::Semaphore::new(protocol::MAX_PARTIAL_UPLOADS_PER_CONNECTION);
    let mut uploads = futures::stream::iter(files.into_iter().map(|(digest, path)| async move {
        let bytes = tokio::task::spawn_blocking({
            let path = path.clone();
            move || std::fs::read(path)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| format!("cannot read {} to ship it: {e}", path.display()))?;
        if Digest::of(&bytes) != digest {
            return Err(format!(
                "{} changed while the run started; run again",
                path.display()
            ));
        }
        let _permit = match bytes.len() > CHUNK_SIZE {
            true => Some(large.acquire().await.map_err(|e| e.to_string())?),
            false => None,
        };
        upload(
            client,
            addr,
            digest,
            &bytes,
            &format!("input file {}", path.display()),
        )
        .await
    }))
    .buffer_unordered(UPLOADS_IN_FLIGHT);
    while let Some(result) = uploads.next().await {
        sent += result?;
    }
    drop(uploads);
    if manifest_missing {
        sent += upload(
            client,
            addr,
            tree.digest,
            &tree.encoded,
            "the input manifest",
        )
        .await?;
    }
    client
        .prepare_inputs(protocol::context_within(PREPARE_LIMIT), tree.digest)
        .await
        .map_err(|e| format!("{addr}: the worker did not build the input tree: {e}"))?
        .map_err(|e| format!("{addr}: the worker cannot build the input tree: {e}"))?;
    Ok((count, sent))
}

/// Uploads `bytes` (named `what` in messages) in chunks; the bytes sent.
async fn upload(
    client: &WorkerClient,
    addr: &str,
    digest: Digest,
    bytes: &[u8],
    what: &str,
) -> Result<u64, String> {
    let total = bytes.len() as u64;
    let mut offset = 0usize;
    loop {
        let end = (offset + CHUNK_SIZE).min(bytes.len());
        let chunk = Chunk {
            digest,
            total,
            offset: offset as u64,
            data: bytes[offset..end].to_vec(),
        };
        let progress = client
            .upload(protocol::context_within(CHUNK_LIMIT), chunk)
            .await
            .map_err(|e| format!("{addr}: uploading {what} failed: {e}"))?
            .map_err(|e| format!("{addr}: the worker refused {what}: {e}"))?;
        offset = end;
        match progress {
            UploadProgress::Stored => return Ok(total),
            UploadProgress::Partial(_) if offset < bytes.len() => {}
            UploadProgress::Partial(received) => {
                return Err(format!(
                    "{addr}: the worker did not store {what} after all {total} bytes (it counted {received})"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_local() {
        assert_eq!(
            WorkersSpec::parse("a:1, b.example:7878,[::1]:9,a:1", "DTF_WORKERS"),
            Ok(WorkersSpec::Remote(vec![
                "a:1".into(),
                "b.example:7878".into(),
                "[::1]:9".into()
            ]))
        );
        assert_eq!(
            WorkersSpec::parse("local:3", "x"),
            Ok(WorkersSpec::Local(3))
        );
        for bad in [
            "local:0",
            "local:x",
            "hostonly",
            "h:notaport",
            "h:0",
            ":80",
            "::1:80",
            "",
            " , ",
        ] {
            let err = WorkersSpec::parse(bad, "DTF_WORKERS").unwrap_err();
            assert!(err.contains("DTF_WORKERS"), "{bad}: {err}");
        }
        let err = WorkersSpec::parse("good:1,bad", "DTF_WORKERS").unwrap_err();
        assert!(err.contains("`bad`"), "{err}");
    }
}
