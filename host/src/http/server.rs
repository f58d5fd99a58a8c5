//! The server loop under the routes: hyper's HTTP/1 connections with limits warp does
//! not expose (head size and timeout, connection count), and a bounded drain.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::body::Incoming;
use warp::Filter;
use warp::reply::Response;

/// Limits of the HTTP server itself (below the routes).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request head (and the keep-alive idle limit).
    pub header_timeout: std::time::Duration,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
}

/// Serves `routes` on `listener` until `shutdown` resolves, then lets open requests
/// finish for up to `drain`; `first` answers the requests it can before `routes`
/// see them (the service gives it the plain reads of one user). Slow clients are cut
/// by the head timeout, oversized heads get 431, and connections past the limit get
/// a 503 and are closed, so no client can hold the server's memory or sockets
/// hostage.
pub async fn serve<F, P>(
    listener: tokio::net::TcpListener,
    routes: F,
    first: P,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()>,
    drain: std::time::Duration,
) where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
    P: Fn(&hyper::Request<Incoming>) -> Option<Response> + Clone + Send + Sync + 'static,
{
    use futures_util::future::Either;
    use hyper::service::Service as _;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192) + 8192)
        .max_header_size(limits.max_header_bytes);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(too_busy(stream));
            continue;
        };
        let chain = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let first = first.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| match first(&req) {
                Some(r) => Either::Left(std::future::ready(Ok::<_, Infallible>(r))),
                None => Either::Right(chain.call(req)),
            });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!("HTTP connection: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open HTTP connections dropped after {drain:?}");
    }
}

/// The answer to a connection past the limit.
async fn too_busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    let body = r#"{"error":"busy","message":"too many open connections; retry shortly"}"#;
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
