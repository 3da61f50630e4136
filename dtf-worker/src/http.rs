//! The operator's HTTP endpoint (`--http ADDR`): `/healthz`, `/readyz`, `/metrics` and a
//! status page at `/`.
//!
//! It is a small HTTP/1.1 responder on tokio (one `GET` or `HEAD` per connection, then
//! close), not a framework: a scrape or a probe needs nothing more, and it adds no crate. It
//! needs no token because nothing on it can start work or change the worker; what it shows is
//! what `dtf-worker status` shows. Everything a peer sent (test names, run labels) is
//! HTML-escaped on the page.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dtf::outcome::format_duration;
use dtf::protocol::human_bytes;
// The HTML report's escaping: markup, quotes, and control characters HTML does not allow.
use dtf::report::html::esc as escape;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::metrics::Outcome;
use crate::service::Shared;

/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// How long a client may take to send its request and read the answer.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// HTTP connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// Seconds between the status page's refreshes.
const REFRESH_SECS: u32 = 2;

/// Serves the endpoint on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let room = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = room.clone().try_acquire_owned() else {
                        debug!("closing an HTTP connection: {MAX_CONNECTIONS} are open");
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(REQUEST_LIMIT, answer(stream, &shared)).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!("cannot accept an HTTP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    info!("HTTP endpoint stopped");
}

/// A response: status line, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

async fn answer(mut stream: TcpStream, shared: &Arc<Shared>) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() >= MAX_HEAD {
            break false;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let (response, head_only) = if !complete && head.len() < MAX_HEAD {
        // The client went away before finishing its request.
        return;
    } else if !complete {
        (
            Response::text(
                "431 Request Header Fields Too Large",
                "request head too long\n",
            ),
            false,
        )
    } else {
        route(&head, shared).await
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n\
         Connection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(response.body.as_bytes());
    }
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

/// The response to the request whose head is `head`, and whether only its head is sent.
async fn route(head: &[u8], shared: &Arc<Shared>) -> (Response, bool) {
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
        .unwrap_or_default();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return (
            Response::text("400 Bad Request", "bad request line\n"),
            false,
        );
    };
    if !version.starts_with("HTTP/1.") {
        return (
            Response::text("505 HTTP Version Not Supported", "HTTP/1.x only\n"),
            false,
        );
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return (
                Response::text(
                    "405 Method Not Allowed",
                    "only GET and HEAD: nothing here changes the worker\n",
                ),
                false,
            );
        }
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let response = match path {
        "/healthz" => Response::text("200 OK", "ok\n"),
        "/readyz" => match readiness(shared).await {
            Ok(()) => Response::text("200 OK", "ready\n"),
            Err(why) => Response::text("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        "/metrics" => Response {
            status: "200 OK",
            content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body: shared.metrics.encode(shared.gauges()),
        },
        "/" => {
            let ready = readiness(shared).await;
            Response {
                status: "200 OK",
                content_type: "text/html; charset=utf-8",
                body: page(shared, ready),
            }
        }
        _ => Response::text(
            "404 Not Found",
            "not found: try /, /healthz, /readyz or /metrics\n",
        ),
    };
    (response, head_only)
}

/// `Ok` when the worker accepts work: it is not draining and its cache takes uploads.
pub async fn readiness(shared: &Arc<Shared>) -> Result<(), String> {
    if shared.is_draining() {
        return Err("draining".to_owned());
    }
    let probe = shared.clone();
    match tokio::task::spawn_blocking(move || probe.cache.usable()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(format!("the cache is unusable: {why}")),
        Err(e) => Err(format!("cannot check the cache: {e}")),
    }
}

fn elapsed(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format_duration(d)
    }
}

/// The status page.
fn page(shared: &Shared, ready: Result<(), String>) -> String {
    let status = shared.snapshot();
    let name = escape(&status.name);
    let mut p = String::new();
    let _ = write!(
        p,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>dtf-worker {name}</title><style>\
         body{{font-family:sans-serif;margin:1.5em;color:#222}}\
         table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}}\
         .passed{{color:#070}}.failed,.timed_out,.system_error{{color:#b00}}.note{{color:#666}}\
         </style></head><body>\n<h1>dtf-worker <span id=\"name\">{name}</span></h1>\n"
    );
    let state = match &ready {
        Ok(()) => "ready".to_owned(),
        Err(why) => format!("not ready: {}", escape(why)),
    };
    let _ = writeln!(
        p,
        "<p>version {} (protocol {}), up for {}; <b id=\"state\">{state}</b></p>",
        escape(&status.version),
        status.protocol,
        format_duration(Duration::from_secs(status.uptime_secs.max(1)))
    );
    let _ = writeln!(
        p,
        "<h2>Slots</h2>\n<p id=\"slots\">{} of {} busy, {} waiting; {} run{} connected</p>",
        status.running.len(),
        status.slots,
        status.waiting,
        status.connections,
        if status.connections == 1 { "" } else { "s" }
    );
    p.push_str("<h2>Running</h2>\n");
    if status.running.is_empty() {
        p.push_str("<p class=\"note\">nothing</p>\n");
    } else {
        p.push_str("<table id=\"running\"><tr><th>Test</th><th>For</th><th>Run</th></tr>\n");
        for r in &status.running {
            let _ = writeln!(
                p,
                "<tr><td class=\"test\">{}</td><td>{}</td><td>{}</td></tr>",
                escape(&r.test),
                elapsed(Duration::from_millis(r.running_ms)),
                escape(&r.run)
            );
        }
        p.push_str("</table>\n");
    }
    p.push_str("<h2>Recent results</h2>\n");
    let recent = shared.metrics.recent();
    if recent.is_empty() {
        p.push_str("<p class=\"note\">none yet</p>\n");
    } else {
        p.push_str(
            "<table id=\"recent\"><tr><th>Test</th><th>Outcome</th><th>Took</th><th>Ended</th><th>Run</th></tr>\n",
        );
        let now = SystemTime::now();
        for f in &recent {
            let ago = now.duration_since(f.at).unwrap_or_default();
            let _ = writeln!(
                p,
                "<tr><td class=\"test\">{}</td><td class=\"{}\">{}</td><td>{}</td><td>{} ago</td><td>{}</td></tr>",
                escape(&f.test),
                f.outcome.label(),
                f.outcome.label().replace('_', " "),
                elapsed(f.duration),
                format_duration(Duration::from_secs(ago.as_secs().max(1))),
                escape(&f.run)
            );
        }
        p.push_str("</table>\n");
    }
    let totals: Vec<String> = Outcome::ALL
        .iter()
        .map(|&o| {
            format!(
                "{} {}",
                shared.metrics.tests(o),
                o.label().replace('_', " ")
            )
        })
        .collect();
    let _ = writeln!(p, "<p>tests so far: {}</p>", totals.join(", "));
    let cache = shared.cache.stats();
    let _ = writeln!(
        p,
        "<h2>Cache</h2>\n<p id=\"cache\">{} blobs, {} of {}; {} hits, {} misses, {} evictions; {} received</p>",
        cache.entries,
        human_bytes(cache.bytes),
        human_bytes(cache.max),
        cache.hits,
        cache.misses,
        cache.evictions,
        human_bytes(cache.received)
    );
    let _ = writeln!(
        p,
        "<p class=\"note\">refreshes every {REFRESH_SECS} s; <a href=\"/metrics\">/metrics</a></p>\n</body></html>"
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;

    fn shared(dir: &std::path::Path) -> Arc<Shared> {
        let cache = Cache::open(&dir.join("cache"), 1 << 20).unwrap();
        Shared::new(
            "w<1>".into(),
            2,
            cache,
            dir.to_path_buf(),
            None,
            Duration::from_secs(300),
        )
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[tokio::test]
    async fn readiness_follows_draining_and_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        assert_eq!(readiness(&shared).await, Ok(()));
        shared.set_draining(true);
        assert_eq!(readiness(&shared).await, Err("draining".to_owned()));
        shared.set_draining(false);
        std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
        let why = readiness(&shared).await.unwrap_err();
        assert!(why.contains("cache is unusable"), "{why}");
    }

    #[tokio::test]
    async fn routes_answer_and_refuse_what_they_should() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        let (r, head_only) = route(b"GET /healthz HTTP/1.1\r\n\r\n", &shared).await;
        assert_eq!(
            (r.status, r.body.as_str(), head_only),
            ("200 OK", "ok\n", false)
        );
        let (r, head_only) = route(b"HEAD /readyz?x=1 HTTP/1.0\r\n\r\n", &shared).await;
        assert_eq!((r.status, head_only), ("200 OK", true));
        let (r, _) = route(b"POST / HTTP/1.1\r\n\r\n", &shared).await;
        assert!(r.status.starts_with("405"), "{}", r.status);
        let (r, _) = route(b"GET /nope HTTP/1.1\r\n\r\n", &shared).await;
        assert!(r.status.starts_with("404"), "{}", r.status);
        let (r, _) = route(b"garbage\r\n\r\n", &shared).await;
        assert!(r.status.starts_with("400"), "{}", r.status);
        let (r, _) = route(b"GET / HTTP/1.1\r\n\r\n", &shared).await;
        assert!(
            r.body
                .contains("dtf-worker <span id=\"name\">w&lt;1&gt;</span>"),
            "{}",
            r.body
        );
        assert!(!r.body.contains("w<1>"), "{}", r.body);
    }
}
