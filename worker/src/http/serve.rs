//! The HTTP server's accept loop: what `axum::serve` does, with the bounds a daemon that must
//! not be starved by its own HTTP clients needs. Every connection counts against
//! [`Limits::max_connections`] (over it, a new connection is closed at once: file descriptors
//! stay for the database and the broker); a client that sends no complete request head within
//! [`Limits::header_read_timeout`] is disconnected (idle keep-alive connections too); a request
//! gets [`Limits::request_timeout`] to be answered (503 after it); at shutdown connections end
//! their request in flight within [`Limits::shutdown_grace`] and idle ones close at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The server's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// Serves `app` on `listener` until `stop`, within `limits`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let app = app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| bounded(limits.request_timeout, req, next),
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        // Reap the connections that ended.
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to come back.
                tracing::warn!(error = %e, "HTTP: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    limit = limits.max_connections,
                    "HTTP: too many open connections; closing new ones"
                );
            }
            continue;
        };
        connections.spawn(connection(stream, app.clone(), limits, stop.clone(), slot));
    }
    // Stopped: what did not end within the grace is dropped.
    let drained = tokio::time::timeout(limits.shutdown_grace + Duration::from_millis(500), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
}

/// Serves one connection, holding its `slot` until it ends.
async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let service = TowerToHyperService::new(app);
    let connection = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stop.cancelled() => {
            // Ends after the request in flight, at once when idle.
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.shutdown_grace, connection).await;
        }
    }
}

/// Answers 503 when the handler takes longer than `limit`.
async fn bounded(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": {"code": "UNAVAILABLE", "message": format!("no answer within {}s", limit.as_secs())}})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn started(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/fast", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, limits, stop.clone()));
        (addr, stop, server)
    }

    async fn get_status(addr: std::net::SocketAddr, path: &str) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.lines().next().map(str::to_owned)
    }

    /// Connections over the bound are closed at once; a silent client is disconnected after the
    /// header timeout, which frees its slot; a slow handler gets 503; a stop with idle clients
    /// returns at once.
    #[tokio::test]
    async fn connections_are_bounded_silent_ones_dropped_and_slow_requests_cut() {
        let limits = Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_millis(300),
            shutdown_grace: Duration::from_secs(2),
        };
        let (addr, stop, server) = started(limits).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            get_status(addr, "/fast").await,
            None,
            "over the bound: closed without an answer"
        );
        // The silent ones are dropped by the header timeout: their slots come back.
        let mut closed = 0;
        for s in &mut idle {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(3), s.read(&mut byte)).await;
            if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        assert_eq!(closed, 4, "every silent connection was closed");
        assert_eq!(
            get_status(addr, "/fast").await.as_deref(),
            Some("HTTP/1.1 200 OK")
        );
        assert_eq!(
            get_status(addr, "/slow").await.as_deref(),
            Some("HTTP/1.1 503 Service Unavailable")
        );
        // A stop with an idle keep-alive client open returns well before the grace.
        let _open = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops")
            .expect("no panic");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "an idle client does not hold the stop: {:?}",
            started.elapsed()
        );
    }
}
