//! The daemon's HTTP endpoints: `/healthz` (the process answers and every
//! environment's pass loop keeps making progress),
//! `/readyz` (first pass done, last pass not failing on stackwarden's side),
//! `/metrics` (Prometheus text), `/status` (JSON per environment), and the
//! status page for people: `/` and `/env/<name>` (see
//! [`crate::status_page`]).
//!
//! A deliberately small HTTP/1.1 responder for GET requests on a local port:
//! one request per connection, no bodies read, nothing to configure.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::controller::Shared;

const HTML: &str = "text/html; charset=utf-8";

/// Longest time a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &shared).await {
                        tracing::debug!(message = "Endpoint connection failed.", error = %e);
                    }
                });
            }
            Err(e) => {
                tracing::warn!(message = "Accept failed.", error = %e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read until the end of the request head (or the buffer is full).
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf[len..]).await?;
            len += n;
            if n == 0 || buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                return Ok::<_, std::io::Error>(());
            }
        }
    })
    .await;
    if read.is_err() {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => match shared.liveness() {
            Ok(()) => (200, "text/plain", "ok\n".to_owned()),
            Err(why) => (503, "text/plain", format!("unhealthy: {why}\n")),
        },
        ("GET", "/readyz") => match shared.readiness() {
            Ok(what) => (200, "text/plain", format!("{what}\n")),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        },
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", shared.metrics_text()),
        ("GET", "/status") => (200, "application/json", shared.status_json()),
        ("GET", "/") => (200, HTML, shared.page_index(std::time::SystemTime::now())),
        ("GET", p) if p.starts_with("/env/") => {
            let page = crate::status_page::decode_segment(&p["/env/".len()..])
                .and_then(|name| shared.page_env(&name, std::time::SystemTime::now()));
            match page {
                Some(page) => (200, HTML, page),
                None => (404, "text/plain", "no such environment\n".to_owned()),
            }
        }
        ("GET", _) => (404, "text/plain", "not found\n".to_owned()),
        _ => (405, "text/plain", "method not allowed\n".to_owned()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    // The page loads nothing and runs nothing: the browser is told so too.
    let extra = if content_type == HTML {
        "Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
