//! Which workers a run uses (`DTF_WORKERS` / `--workers`), connecting to them in parallel and
//! shipping the test binary to those that lack it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::inputs::Tree;
use crate::protocol::{
    self, CHUNK_SIZE, Chunk, Connection, Digest, Hello, RunKey, Token, UploadProgress, WorkerClient,
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
    /// `host:port,dns:NAME:PORT,file:PATH,...`
    Remote(Vec<Entry>),
    /// `local:N`: N `dtf-worker` processes on loopback, for the length of the run.
    Local(usize),
}

/// One entry of `DTF_WORKERS`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    /// `host:port`: one worker.
    Addr(String),
    /// `dns:NAME:PORT`: a worker at every A and AAAA record of NAME (a Kubernetes headless
    /// Service), looked up again during the run.
    Dns {
        /// The name.
        name: String,
        /// The port.
        port: u16,
    },
    /// `file:PATH`: the addresses the file lists (`host:port` or `dns:NAME:PORT`, separated
    /// by commas, spaces or lines; `#` starts a comment), read again during the run.
    File(PathBuf),
}

impl Entry {
    /// True when the entry can change during the run (`dns:` and `file:`).
    pub fn is_dynamic(&self) -> bool {
        !matches!(self, Entry::Addr(_))
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Addr(a) => f.write_str(a),
            Entry::Dns { name, port } => write!(f, "dns:{name}:{port}"),
            Entry::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// The most workers `local:N` starts.
pub const MAX_LOCAL: usize = 64;

/// How often `dns:` and `file:` entries are looked up again, unless `DTF_WORKERS_REFRESH` says.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(10);

/// `host:port` with a port from 1 to 65535 and a host without spaces (IPv6 in brackets).
fn host_port_ok(entry: &str) -> bool {
    let Some((host, port)) = entry.rsplit_once(':') else {
        return false;
    };
    let host_ok = !host.is_empty()
        && !host.contains(char::is_whitespace)
        && (host.starts_with('[') == host.ends_with(']'))
        && (host.starts_with('[') || !host.contains(':'));
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// Parses one entry (`host:port`, `dns:NAME:PORT`, or with `allow_file`, `file:PATH`).
fn parse_entry(entry: &str, source: &str, allow_file: bool) -> Result<Entry, String> {
    let bad = |what: &str| {
        format!(
            "invalid worker address `{entry}` in {source}: {what} (such as 10.0.0.5:7878, [::1]:7878, \
             dns:workers.ci.svc:7878, file:/etc/dtf/workers, or local:N)"
        )
    };
    if let Some(rest) = entry.strip_prefix("dns:") {
        let (name, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("expected dns:NAME:PORT"))?;
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        let port = port.parse::<u16>().ok().filter(|&p| p != 0);
        return match (name_ok, port) {
            (true, Some(port)) => Ok(Entry::Dns {
                name: name.to_owned(),
                port,
            }),
            _ => Err(bad("expected dns:NAME:PORT")),
        };
    }
    if let Some(path) = entry.strip_prefix("file:") {
        if !allow_file {
            return Err(bad("a file of addresses cannot name another file"));
        }
        if path.is_empty() {
            return Err(bad("expected file:PATH"));
        }
        return Ok(Entry::File(PathBuf::from(path)));
    }
    if host_port_ok(entry) {
        Ok(Entry::Addr(entry.to_owned()))
    } else {
        Err(bad("expected host:port"))
    }
}

impl WorkersSpec {
    /// Parses `host:port,dns:NAME:PORT,file:PATH,...` or `local:N`. `source` names the flag
    /// or variable. Repeated entries count once.
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
        let mut entries = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let entry = parse_entry(entry, source, true)?;
            if !entries.contains(&entry) {
                entries.push(entry);
            }
        }
        if entries.is_empty() {
            return Err(format!(
                "invalid {source}=`{value}`: expected host:port,host:port (or dns:NAME:PORT, file:PATH, local:N)"
            ));
        }
        Ok(WorkersSpec::Remote(entries))
    }
}

/// The entries a `file:` entry's text lists, and a message for each it could not read.
pub fn parse_file(text: &str, path: &Path) -> (Vec<Entry>, Vec<String>) {
    let source = format!("the worker file {}", path.display());
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        for word in line
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
        {
            match parse_entry(word, &source, false) {
                Ok(entry) if !entries.contains(&entry) => entries.push(entry),
                Ok(_) => {}
                Err(e) => problems.push(e),
            }
        }
    }
    (entries, problems)
}

/// A worker address the run knows, after looking names up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// What identifies it, to merge duplicates: the socket address it resolves to (else the
    /// address as given).
    pub key: String,
    /// What to connect to.
    pub addr: String,
    /// How the run names it.
    pub label: String,
}

/// The endpoints of `found` in order, each key once (the first label wins).
pub fn merge(found: impl IntoIterator<Item = Endpoint>) -> Vec<Endpoint> {
    let mut seen = std::collections::HashSet::new();
    found
        .into_iter()
        .filter(|e| seen.insert(e.key.clone()))
        .collect()
}

/// How the set of workers changes after a look-up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Endpoints not known before.
    pub joined: Vec<Endpoint>,
    /// Keys of known endpoints that were gone and are back.
    pub returned: Vec<String>,
    /// Keys of endpoints no longer found: they take nothing new and leave when idle.
    pub left: Vec<String>,
}

/// Compares what a look-up `found` with the `known` endpoints (`(key, wanted)`). A look-up
/// that failed in part (`partial`) removes nothing: a DNS hiccup does not empty the fleet.
pub fn changes(known: &[(String, bool)], found: &[Endpoint], partial: bool) -> Changes {
    let mut out = Changes::default();
    for endpoint in found {
        match known.iter().find(|(k, _)| *k == endpoint.key) {
            None => out.joined.push(endpoint.clone()),
            Some((key, false)) => out.returned.push(key.clone()),
            Some(_) => {}
        }
    }
    if !partial {
        for (key, wanted) in known {
            if *wanted && !found.iter().any(|e| &e.key == key) {
                out.left.push(key.clone());
            }
        }
    }
    out
}

/// Looks up every entry: the endpoints (merged) and a message for each look-up that failed.
/// A `host:port` whose name does not resolve stays in (connecting names the problem).
pub async fn resolve(entries: &[Entry], limit: Duration) -> (Vec<Endpoint>, Vec<String>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let mut queue: Vec<Entry> = entries.to_vec();
    let mut i = 0;
    while i < queue.len() {
        let entry = queue[i].clone();
        i += 1;
        match entry {
            Entry::Addr(addr) => {
                let key = lookup(&addr, limit)
                    .await
                    .ok()
                    .and_then(|a| a.first().map(|a| a.to_string()))
                    .unwrap_or_else(|| addr.clone());
                found.push(Endpoint {
                    key,
                    label: addr.clone(),
                    addr,
                });
            }
            Entry::Dns { name, port } => match lookup(&format!("{name}:{port}"), limit).await {
                Ok(addrs) if !addrs.is_empty() => {
                    for a in addrs {
                        found.push(Endpoint {
                            key: a.to_string(),
                            addr: a.to_string(),
                            label: a.to_string(),
                        });
                    }
                }
                Ok(_) => problems.push(format!("dns:{name}:{port}: the name has no address")),
                Err(e) => problems.push(format!("dns:{name}:{port}: cannot look the name up: {e}")),
            },
            Entry::File(path) => {
                let read = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || std::fs::read_to_string(path)
                })
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r);
                match read {
                    Ok(text) => {
                        let (listed, bad) = parse_file(&text, &path);
                        problems.extend(bad);
                        queue.extend(listed);
                    }
                    Err(e) => {
                        problems.push(format!("file:{}: cannot read it: {e}", path.display()))
                    }
                }
            }
        }
    }
    (merge(found), problems)
}

async fn lookup(addr: &str, limit: Duration) -> std::io::Result<Vec<std::net::SocketAddr>> {
    let mut addrs: Vec<std::net::SocketAddr> =
        tokio::time::timeout(limit, tokio::net::lookup_host(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??
            .collect();
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
    Ok(addrs)
}

/// A test binary of the run: its digest, computed once; its bytes are read only when a worker
/// lacks it (a warm run reads each binary once, to hash it, and holds none of it in memory).
#[derive(Clone)]
pub struct Binary {
    /// Its digest.
    pub digest: Digest,
    /// Where it is.
    pub path: std::path::PathBuf,
}

impl Binary {
    /// Hashes the binary at `path`, streaming it (no copy of it is kept), unless its digest
    /// was recorded for exactly this file (see [`digest_cache`]).
    pub fn read(path: &std::path::Path) -> std::io::Result<Binary> {
        let file = std::fs::File::open(path)?;
        let stamp = digest_cache::Stamp::of(&file.metadata()?);
        if let Some(digest) = digest_cache::recorded(path, &stamp) {
            return Ok(Binary {
                digest,
                path: path.to_path_buf(),
            });
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file)?;
        let digest = Digest(*hasher.finalize().as_bytes());
        digest_cache::record(path, &stamp, digest, digest_cache::SETTLE);
        Ok(Binary {
            digest,
            path: path.to_path_buf(),
        })
    }

    /// Hashes every binary of `paths`, a few at a time, in their order.
    pub fn read_all(paths: &[std::path::PathBuf]) -> Result<Vec<Binary>, String> {
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(1, 8)
            .min(paths.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<std::sync::Mutex<Option<std::io::Result<Binary>>>> =
            paths.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = paths.get(i) else {
                            return;
                        };
                        let result = Binary::read(path);
                        if let Ok(mut slot) = results[i].lock() {
                            *slot = Some(result);
                        }
                    }
                });
            }
        });
        paths
            .iter()
            .zip(results)
            .map(|(path, slot)| {
                let result = slot
                    .into_inner()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Err(std::io::Error::other("hashing it did not finish")));
                result.map_err(|e| {
                    format!(
                        "cannot read the test binary {} to ship it: {e}",
                        path.display()
                    )
                })
            })
            .collect()
    }

    /// Its bytes, read again to ship them; they must still have its digest.
    fn bytes(&self) -> Result<Vec<u8>, String> {
        let bytes = std::fs::read(&self.path).map_err(|e| {
            format!(
                "cannot read the test binary {} to ship it: {e}",
                self.path.display()
            )
        })?;
        if Digest::of(&bytes) != self.digest {
            return Err(format!(
                "the test binary {} changed while the run started; run again",
                self.path.display()
            ));
        }
        Ok(bytes)
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
    /// Connecting, saying hello or a call failed, or the worker is draining: the run tries
    /// again later.
    Unreachable(String),
    /// The worker refused this run (a token that does not match, another protocol version) or
    /// what it needs (a binary over its cache cap, an input tree it cannot build): the run goes
    /// on without it.
    Failed(String),
}

/// Connects to `addr`, authenticates, uploads the binaries the worker lacks and has it build
/// each of `trees` (shipping the files it lacks). `key` is the run's identity: a worker that
/// still holds what this run shipped finds it again.
pub async fn prepare(
    addr: &str,
    label: &str,
    token: Option<&Token>,
    run_label: &str,
    key: Option<RunKey>,
    binaries: &[Binary],
    trees: &[std::sync::Arc<Tree>],
) -> Result<Ready, Unusable> {
    let started = Instant::now();
    let hello = Hello {
        run: run_label.to_owned(),
        key,
    };
    let Connection { client, info, .. } = protocol::connect(addr, token, hello, CONNECT_LIMIT)
        .await
        .map_err(|e| {
            if e.is_transient() {
                Unusable::Unreachable(e.to_string())
            } else {
                Unusable::Failed(e.to_string())
            }
        })?;
    if info.draining {
        return Err(Unusable::Unreachable(
            "it is draining (it takes no new tests)".to_owned(),
        ));
    }
    let lost = |e: tarpc::client::RpcError| {
        Unusable::Unreachable(format!("{addr}: the worker did not answer: {e}"))
    };
    let mut digests: Vec<Digest> = binaries.iter().map(|b| b.digest).collect();
    digests.dedup();
    let missing = client
        .missing(protocol::context_within(CHUNK_LIMIT), digests)
        .await
        .map_err(lost)?;
    let mut shipped = 0;
    let mut sent = std::collections::HashSet::new();
    for binary in binaries {
        if missing.contains(&binary.digest) && sent.insert(binary.digest) {
            let read = binary.clone();
            let bytes = tokio::task::spawn_blocking(move || read.bytes())
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map_err(Unusable::Failed)?;
            shipped += upload(&client, addr, binary.digest, &bytes, "the test binary").await?;
        }
    }
    // One tree after the other: a file two trees share is found on the worker the second time.
    let (mut input_files, mut input_bytes) = (0, 0);
    for tree in trees {
        let (files, bytes) = ship_inputs(&client, addr, tree).await?;
        input_files += files;
        input_bytes += bytes;
    }
    Ok(Ready {
        label: label.to_owned(),
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
async fn ship_inputs(
    client: &WorkerClient,
    addr: &str,
    tree: &Tree,
) -> Result<(u64, u64), Unusable> {
    let mut digests: Vec<Digest> = tree.blobs.keys().copied().collect();
    digests.push(tree.digest);
    let mut missing = Vec::new();
    for batch in digests.chunks(MISSING_BATCH) {
        let answer = client
            .missing(protocol::context_within(CHUNK_LIMIT), batch.to_vec())
            .await
            .map_err(|e| {
                Unusable::Unreachable(format!("{addr}: the worker did not answer: {e}"))
            })?;
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
        .map_err(|e| Unusable::Failed(format!("cannot read {} to ship it: {e}", path.display())))?;
        if Digest::of(&bytes) != digest {
            return Err(Unusable::Failed(format!(
                "{} changed while the run started; run again",
                path.display()
            )));
        }
        let _permit = match bytes.len() > CHUNK_SIZE {
            true => Some(
                large
                    .acquire()
                    .await
                    .map_err(|e| Unusable::Failed(e.to_string()))?,
            ),
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
        .map_err(|e| {
            Unusable::Unreachable(format!(
                "{addr}: the worker did not build the input tree: {e}"
            ))
        })?
        .map_err(|e| {
            Unusable::Failed(format!(
                "{addr}: the worker cannot build the input tree: {e}"
            ))
        })?;
    Ok((count, sent))
}

/// Uploads `bytes` (named `what` in messages) in chunks; the bytes sent.
async fn upload(
    client: &WorkerClient,
    addr: &str,
    digest: Digest,
    bytes: &[u8],
    what: &str,
) -> Result<u64, Unusable> {
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
            .map_err(|e| Unusable::Unreachable(format!("{addr}: uploading {what} failed: {e}")))?
            .map_err(|e| Unusable::Failed(format!("{addr}: the worker refused {what}: {e}")))?;
        offset = end;
        match progress {
            UploadProgress::Stored => return Ok(total),
            UploadProgress::Partial(_) if offset < bytes.len() => {}
            UploadProgress::Partial(received) => {
                return Err(Unusable::Failed(format!(
                    "{addr}: the worker did not store {what} after all {total} bytes (it counted {received})"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(a: &str) -> Entry {
        Entry::Addr(a.to_owned())
    }

    #[test]
    fn parses_addresses_and_local() {
        assert_eq!(
            WorkersSpec::parse("a:1, b.example:7878,[::1]:9,a:1", "DTF_WORKERS"),
            Ok(WorkersSpec::Remote(vec![
                addr("a:1"),
                addr("b.example:7878"),
                addr("[::1]:9")
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
            "dns:",
            "dns:name",
            "dns::80",
            "dns:a b:80",
            "dns:name:0",
            "file:",
        ] {
            let err = WorkersSpec::parse(bad, "DTF_WORKERS").unwrap_err();
            assert!(err.contains("DTF_WORKERS"), "{bad}: {err}");
        }
        let err = WorkersSpec::parse("good:1,bad", "DTF_WORKERS").unwrap_err();
        assert!(err.contains("`bad`"), "{err}");
    }

    #[test]
    fn entries_mix_and_repeat_once() {
        assert_eq!(
            WorkersSpec::parse(
                "dns:workers.ci.svc:7878, a:1, file:/etc/w, dns:workers.ci.svc:7878",
                "DTF_WORKERS"
            ),
            Ok(WorkersSpec::Remote(vec![
                Entry::Dns {
                    name: "workers.ci.svc".into(),
                    port: 7878
                },
                addr("a:1"),
                Entry::File("/etc/w".into()),
            ]))
        );
    }

    #[test]
    fn a_file_lists_addresses_with_comments_and_names_what_it_cannot_read() {
        let path = Path::new("/w");
        let (entries, problems) = parse_file(
            "# the fleet\na:1, b:2\n  dns:svc:7878 # headless\nfile:/other\nnot-an-address\na:1\n",
            path,
        );
        assert_eq!(
            entries,
            vec![
                addr("a:1"),
                addr("b:2"),
                Entry::Dns {
                    name: "svc".into(),
                    port: 7878
                }
            ]
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("cannot name another file"),
            "{problems:?}"
        );
        assert!(problems[1].contains("`not-an-address`") && problems[1].contains("/w"));
    }

    fn ep(key: &str, label: &str) -> Endpoint {
        Endpoint {
            key: key.into(),
            addr: key.into(),
            label: label.into(),
        }
    }

    #[test]
    fn duplicates_merge_by_address_and_the_first_label_wins() {
        let merged = merge([
            ep("127.0.0.2:1", "w1:1"),
            ep("127.0.0.3:1", "127.0.0.3:1"),
            ep("127.0.0.2:1", "127.0.0.2:1"),
        ]);
        assert_eq!(
            merged,
            vec![ep("127.0.0.2:1", "w1:1"), ep("127.0.0.3:1", "127.0.0.3:1")]
        );
    }

    #[test]
    fn a_look_up_adds_new_workers_brings_back_returning_ones_and_lets_vanished_ones_leave() {
        let known = vec![
            ("a".to_owned(), true),
            ("b".to_owned(), true),
            ("c".to_owned(), false),
        ];
        let found = [ep("a", "a"), ep("c", "c"), ep("d", "d")];
        assert_eq!(
            changes(&known, &found, false),
            Changes {
                joined: vec![ep("d", "d")],
                returned: vec!["c".into()],
                left: vec!["b".into()],
            }
        );
        // A look-up that failed in part removes nothing.
        assert!(changes(&known, &found, true).left.is_empty());
        assert_eq!(changes(&known, &[], false).left, vec!["a", "b"]);
    }

    #[test]
    fn names_resolve_to_every_address_and_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("workers");
        std::fs::write(&file, "127.0.0.1:9\n[::1]:9 localhost:9\n").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (found, problems) = rt.block_on(resolve(
            &[
                Entry::File(file.clone()),
                addr("127.0.0.1:9"),
                Entry::File(dir.path().join("absent")),
            ],
            Duration::from_secs(5),
        ));
        let keys: Vec<&str> = found.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.starts_with(&["127.0.0.1:9", "[::1]:9"]), "{keys:?}");
        assert_eq!(
            keys.iter().filter(|k| **k == "127.0.0.1:9").count(),
            1,
            "{keys:?}"
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("absent"), "{problems:?}");
    }
}

/// Binary digests remembered between runs, as Bazel's digest cache does: a warm run does not
/// read its binaries at all.
///
/// A digest is kept beside the binary, in `.dtf-digests/NAME` of its directory, with the
/// file's device, inode, size, and modification and change times. It is used only when all of
/// them still match: rewriting a file, or replacing it (as the linker does), changes its change
/// time or its inode, and the change time cannot be set back from user space. As in git's index,
/// a file changed within the last [`SETTLE`] is not recorded: a second change within the same
/// clock tick would keep its times. A binary about to be shipped is hashed again anyway. A
/// directory that cannot be written just goes uncached.
pub mod digest_cache {
    use crate::protocol::Digest;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    /// How long ago a file must have changed for its digest to be recorded.
    pub const SETTLE: Duration = Duration::from_secs(2);

    /// What identifies one version of a file.
    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct Stamp {
        text: String,
        changed: Option<SystemTime>,
    }

    impl Stamp {
        /// The stamp of the file at `path` now.
        pub fn of_path(path: &Path) -> Option<Stamp> {
            Some(Stamp::of(&std::fs::metadata(path).ok()?))
        }

        /// When the file last changed (its ctime), where that is known.
        pub fn changed(&self) -> Option<SystemTime> {
            self.changed
        }

        /// The stamp of the file `meta` describes.
        pub fn of(meta: &std::fs::Metadata) -> Stamp {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                let changed = u64::try_from(meta.ctime()).ok().map(|secs| {
                    SystemTime::UNIX_EPOCH
                        + Duration::new(secs, u32::try_from(meta.ctime_nsec()).unwrap_or(0))
                });
                Stamp {
                    text: format!(
                        "{} {} {} {}.{} {}.{}",
                        meta.dev(),
                        meta.ino(),
                        meta.len(),
                        meta.mtime(),
                        meta.mtime_nsec(),
                        meta.ctime(),
                        meta.ctime_nsec()
                    ),
                    changed,
                }
            }
            #[cfg(not(unix))]
            {
                // Without a change time nothing is trustworthy enough: never recorded.
                let _ = meta;
                Stamp {
                    text: String::new(),
                    changed: None,
                }
            }
        }
    }

    const HEADER: &str = "dtf-digest 1";

    fn entry(path: &Path) -> Option<PathBuf> {
        let name = path.file_name()?;
        Some(path.parent()?.join(".dtf-digests").join(name))
    }

    /// The digest recorded for `path` at `stamp`, if any.
    pub fn recorded(path: &Path, stamp: &Stamp) -> Option<Digest> {
        if stamp.text.is_empty() {
            return None;
        }
        let text = std::fs::read_to_string(entry(path)?).ok()?;
        let mut lines = text.lines();
        if lines.next()? != HEADER || lines.next()? != stamp.text {
            return None;
        }
        Digest::from_hex(lines.next()?)
    }

    /// Records `digest` for `path` at `stamp` if the file changed at least `settle` ago;
    /// failures are ignored (the next run hashes again).
    pub fn record(path: &Path, stamp: &Stamp, digest: Digest, settle: Duration) {
        let settled = stamp
            .changed
            .and_then(|changed| SystemTime::now().duration_since(changed).ok())
            .is_some_and(|age| age >= settle);
        if stamp.text.is_empty() || !settled {
            return;
        }
        let Some(entry) = entry(path) else {
            return;
        };
        let Some(dir) = entry.parent() else {
            return;
        };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir) else {
            return;
        };
        use std::io::Write as _;
        let text = format!("{HEADER}\n{}\n{}\n", stamp.text, digest.to_hex());
        if tmp.write_all(text.as_bytes()).is_ok() {
            let _ = tmp.persist(&entry);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::Binary;
        use super::*;

        fn stamp(path: &Path) -> Stamp {
            Stamp::of(&std::fs::metadata(path).unwrap())
        }

        #[test]
        fn a_recorded_digest_is_used_only_for_the_same_file_version() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bin");
            std::fs::write(&path, b"one").unwrap();
            // A recorded digest is what is used while the stamp holds (proved by planting one).
            let planted = Digest::of(b"planted");
            record(&path, &stamp(&path), planted, Duration::ZERO);
            assert_eq!(recorded(&path, &stamp(&path)), Some(planted));
            assert_eq!(Binary::read(&path).unwrap().digest, planted);

            // Rewritten in place with another size: hashed again.
            std::fs::write(&path, b"second").unwrap();
            assert_eq!(Binary::read(&path).unwrap().digest, Digest::of(b"second"));
            // Replaced, as a linker does, even with the same size: hashed again.
            record(&path, &stamp(&path), planted, Duration::ZERO);
            let other = dir.path().join("new");
            std::fs::write(&other, b"third!").unwrap();
            std::fs::rename(&other, &path).unwrap();
            assert_eq!(Binary::read(&path).unwrap().digest, Digest::of(b"third!"));
        }

        #[test]
        fn a_file_that_just_changed_is_not_recorded() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bin");
            std::fs::write(&path, b"one").unwrap();
            assert_eq!(Binary::read(&path).unwrap().digest, Digest::of(b"one"));
            assert_eq!(
                recorded(&path, &stamp(&path)),
                None,
                "changed under SETTLE ago"
            );
            record(
                &path,
                &stamp(&path),
                Digest::of(b"one"),
                Duration::from_secs(3600),
            );
            assert_eq!(recorded(&path, &stamp(&path)), None);
        }

        #[test]
        fn a_damaged_record_is_ignored() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bin");
            std::fs::write(&path, b"one").unwrap();
            let entry = entry(&path).unwrap();
            std::fs::create_dir_all(entry.parent().unwrap()).unwrap();
            let text = format!("{HEADER}\n{}\nnot-hex\n", stamp(&path).text);
            std::fs::write(&entry, text).unwrap();
            assert_eq!(recorded(&path, &stamp(&path)), None);
            assert_eq!(Binary::read(&path).unwrap().digest, Digest::of(b"one"));
        }
    }
}
