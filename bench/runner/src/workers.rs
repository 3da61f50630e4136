//! Real `dtf-worker` processes on loopback for the distributed measurements, optionally inside
//! a network namespace whose loopback has simulated latency (`tc netem`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::measure::clean_command;

/// A network namespace of this benchmark whose `lo` delays every packet by half the round
/// trip. Removed on drop.
pub struct LatencyNet {
    name: String,
}

impl LatencyNet {
    /// Creates the namespace; an error says why the machine does not permit it.
    pub fn create(rtt_ms: u64) -> Result<LatencyNet, String> {
        let name = format!("dtf-bench-{}-{rtt_ms}", std::process::id());
        run_ip(&["netns", "add", &name])?;
        let net = LatencyNet { name };
        run_ip(&["netns", "exec", &net.name, "ip", "link", "set", "lo", "up"])?;
        let delay = format!("{}ms", rtt_ms as f64 / 2.0);
        run_ip(&[
            "netns", "exec", &net.name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
            "delay", &delay,
        ])?;
        Ok(net)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = clean_command(Path::new("ip"));
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for LatencyNet {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.name]);
    }
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// K running workers with a shared random token, each with its own cache and temp directory.
pub struct LocalWorkers {
    children: Vec<Child>,
    addrs: Vec<String>,
    token: String,
    _dir: tempfile::TempDir,
}

impl LocalWorkers {
    /// Starts `k` workers with `slots` slots each (inside `net` when given) and waits for each
    /// to print its address.
    pub fn start(
        worker_bin: &Path,
        k: usize,
        slots: usize,
        net: Option<&LatencyNet>,
    ) -> Result<LocalWorkers, String> {
        LocalWorkers::start_with_env(worker_bin, k, slots, net, &[])
    }

    /// As [`LocalWorkers::start`], with extra environment for the worker processes.
    pub fn start_with_env(
        worker_bin: &Path,
        k: usize,
        slots: usize,
        net: Option<&LatencyNet>,
        env: &[(&str, &str)],
    ) -> Result<LocalWorkers, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        // 256 random bits as hex, as `dtf-worker token` makes them.
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(|e| e.to_string())?,
            &mut bytes,
        )
        .map_err(|e| e.to_string())?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &token).map_err(|e| e.to_string())?;
        let mut workers = LocalWorkers {
            children: Vec::new(),
            addrs: Vec::new(),
            token,
            _dir: dir,
        };
        for i in 0..k {
            let base = workers._dir.path().join(format!("w{i}"));
            let tmp = base.join("tmp");
            std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            let mut cmd = match net {
                Some(net) => net.command(worker_bin),
                None => clean_command(worker_bin),
            };
            cmd.args(["--listen", "127.0.0.1:0", "--slots", &slots.to_string()])
                .arg("--cache-dir")
                .arg(base.join("cache"))
                .arg("--token-file")
                .arg(&token_file)
                .env("TMPDIR", &tmp)
                .envs(env.iter().copied())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", worker_bin.display()))?;
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(|e| format!("worker did not start: {e}"))?;
            let addr = line
                .split_whitespace()
                .last()
                .filter(|a| a.contains(':'))
                .ok_or_else(|| format!("worker printed no address: {line:?}"))?
                .to_owned();
            workers.addrs.push(addr);
            workers.children.push(child);
        }
        Ok(workers)
    }

    /// `DTF_WORKERS` for these workers.
    pub fn addrs(&self) -> String {
        self.addrs.join(",")
    }

    /// The workers' addresses.
    pub fn addrs_list(&self) -> Vec<String> {
        self.addrs.clone()
    }

    /// The shared token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Runs `binary args` against the workers; its wall time and the binary bytes it shipped
    /// (read from the run's summary notes).
    pub fn run_counting_bytes(
        &self,
        binary: &Path,
        args: &[&str],
    ) -> Result<(Duration, u64), String> {
        let started = Instant::now();
        let out = clean_command(binary)
            .args(args)
            .env("DTF_WORKERS", self.addrs())
            .env("DTF_TOKEN", &self.token)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        if !out.status.success() {
            return Err(format!(
                "distributed run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((
            elapsed,
            shipped_bytes(&text)
                .ok_or_else(|| format!("no shipping figure in the output:\n{text}"))?,
        ))
    }

    /// Runs `binary args` against the workers with extra environment; its wall time and its
    /// stdout and stderr.
    pub fn run_with_env(
        &self,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(Duration, String), String> {
        let started = Instant::now();
        let out = clean_command(binary)
            .args(args)
            .env("DTF_WORKERS", self.addrs())
            .env("DTF_TOKEN", &self.token)
            .env("DTF_REQUIRE_WORKERS", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!("distributed run failed:\n{text}"));
        }
        Ok((elapsed, text))
    }

    /// Resident set size of worker `i` now, in KiB.
    pub fn rss_kib(&self, i: usize) -> Result<u64, String> {
        let pid = self.children.get(i).ok_or("no such worker")?.id();
        status_field(pid, "VmRSS:").ok_or_else(|| "cannot read the worker's RSS".to_owned())
    }

    /// Runs `binary args` against the workers and returns worker `i`'s peak RSS (VmHWM) after.
    pub fn peak_rss_during(&self, i: usize, binary: &Path, args: &[&str]) -> Result<u64, String> {
        let status = clean_command(binary)
            .args(args)
            .env("DTF_WORKERS", self.addrs())
            .env("DTF_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("distributed run failed: {status}"));
        }
        let pid = self.children.get(i).ok_or("no such worker")?.id();
        status_field(pid, "VmHWM:").ok_or_else(|| "cannot read the worker's peak RSS".to_owned())
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The bytes of binary shipped, from dtf's distributed summary note
/// (`dtf: 4 workers; binary shipped to 0 of 4 (0 bytes), ...`).
/// The bytes of the `dtf: inputs: ... shipped to N of M (B bytes ...` line.
pub fn input_bytes(text: &str) -> Option<u64> {
    text.lines()
        .filter(|line| line.starts_with("dtf: inputs: "))
        .find_map(|line| {
            let rest = line.split('(').nth(1)?;
            let number: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            number.parse().ok()
        })
}

fn shipped_bytes(text: &str) -> Option<u64> {
    text.lines()
        .filter(|line| line.contains("binary shipped to"))
        .find_map(|line| {
            let rest = line.split('(').nth(1)?;
            let number: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            number.parse().ok()
        })
}

/// A `kB` field of /proc/PID/status.
fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs `binary args` as a coordinator against `workers` and returns its own peak RSS in KiB
/// (from `wait4`'s resource usage, which covers exactly that process).
pub fn peak_rss_of_run(
    binary: &Path,
    args: &[&str],
    workers: &LocalWorkers,
) -> Result<u64, String> {
    let child = clean_command(binary)
        .args(args)
        .env("DTF_WORKERS", workers.addrs())
        .env("DTF_TOKEN", &workers.token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for; both out-pointers are valid.
    let rc = unsafe { nix::libc::wait4(pid, &mut status, 0, &mut usage) };
    std::mem::forget(child); // reaped by wait4 above
    if rc != pid {
        return Err(format!("wait4 failed: {}", std::io::Error::last_os_error()));
    }
    if !(nix::libc::WIFEXITED(status) && nix::libc::WEXITSTATUS(status) == 0) {
        return Err(format!("the 10 000-test run failed (status {status:#x})"));
    }
    Ok(usage.ru_maxrss as u64)
}

/// A TCP proxy on loopback that delays every byte by a fixed one-way latency in each
/// direction (order kept, no bandwidth limit): simulated latency where `tc netem` is not
/// available. Stops accepting when dropped.
pub struct DelayProxy {
    addrs: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DelayProxy {
    /// One listener in front of each of `targets`, adding `rtt / 2` each way.
    pub fn start(targets: &[String], rtt: Duration) -> Result<DelayProxy, String> {
        use std::net::TcpListener;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let one_way = rtt / 2;
        let stop = Arc::new(AtomicBool::new(false));
        let mut addrs = Vec::new();
        for target in targets {
            let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            addrs.push(
                listener
                    .local_addr()
                    .map_err(|e| e.to_string())?
                    .to_string(),
            );
            let target = target.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let Ok(server) = std::net::TcpStream::connect(&target) else {
                                continue;
                            };
                            let _ = client.set_nonblocking(false);
                            for s in [&client, &server] {
                                let _ = s.set_nodelay(true);
                            }
                            if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                                pump(client, s2, one_way);
                                pump(server, c2, one_way);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        Ok(DelayProxy { addrs, stop })
    }

    /// `DTF_WORKERS` pointing at the proxies.
    pub fn addrs(&self) -> String {
        self.addrs.join(",")
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies `from` to `to`, each chunk held back until `delay` after it was read.
fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, delay: Duration) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (due, bytes) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}
