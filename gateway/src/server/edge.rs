//! The HTTP edge: accepting connections under a cap, and the clocks that
//! cut off clients who hold a connection without using it.
//!
//! Each connection gets its own [`Clock`], handed to hyper as the timer of
//! its header-read timeout. Hyper starts that timer whenever it begins
//! waiting for a request head (a new connection, or the next request on a
//! kept-alive one), so the clock knows when a wait starts; the socket
//! wrapper ([`Watched`]) tells it when the first byte of the head arrives.
//! Until then the wait is bounded by the idle timeout; from then on by the
//! header timeout. A client that sends half a header, or one that opens a
//! connection and says nothing, is disconnected; the body has its own
//! timeout where it is read ([`super::read_body`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Instant;

use prometheus::{IntCounter, IntGauge};

/// How long clients may take, and how many connections they may hold.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// From a request head's first byte to its end.
    pub header_timeout: Duration,
    /// A connection waiting for its next request, with nothing received.
    pub idle_timeout: Duration,
    /// Open connections; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy)]
struct Wait {
    since: Instant,
    first_byte: Option<Instant>,
}

/// One connection's view of its current wait for a request head.
struct Clock {
    wait: Mutex<Wait>,
    limits: EdgeLimits,
}

impl Clock {
    fn lock(&self) -> std::sync::MutexGuard<'_, Wait> {
        self.wait.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hyper began waiting for a request head.
    fn start(&self) {
        *self.lock() = Wait {
            since: Instant::now(),
            first_byte: None,
        };
    }

    /// Bytes came in.
    fn received(&self) {
        let mut w = self.lock();
        if w.first_byte.is_none() {
            w.first_byte = Some(Instant::now());
        }
    }

    fn deadline(&self) -> Instant {
        let w = *self.lock();
        match w.first_byte {
            None => w.since + self.limits.idle_timeout,
            Some(t) => t + self.limits.header_timeout,
        }
    }
}

/// The header-read timer hyper polls while it waits for a head: its
/// deadline follows the clock (idle, then header timeout).
struct HeadSleep {
    clock: Arc<Clock>,
    at: Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let d = self.clock.deadline();
        if d != self.at {
            self.at = d;
            self.sleep.as_mut().reset(d);
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// A plain sleep, for any other timer hyper asks for.
struct Plain(Pin<Box<tokio::time::Sleep>>);

impl Future for Plain {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for Plain {}

#[derive(Clone)]
struct ConnTimer(Arc<Clock>);

impl ConnTimer {
    fn head(&self) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.0.start();
        let at = self.0.deadline();
        Box::pin(HeadSleep {
            clock: self.0.clone(),
            at,
            sleep: Box::pin(tokio::time::sleep_until(at)),
        })
    }
}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Plain(Box::pin(tokio::time::sleep(d))))
    }

    /// Hyper's HTTP/1 server asks for a deadline only for the header read.
    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.head()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, _deadline: std::time::Instant) {
        *sleep = self.head();
    }
}

/// A socket that tells its clock when bytes arrive.
struct Watched<T> {
    io: T,
    clock: Arc<Clock>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.received();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets the
/// requests in progress finish (for up to `drain`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: EdgeLimits,
    connections: IntGauge,
    timeouts: IntCounter,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let service = hyper_util::service::TowerToHyperService::new(app);
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the cap, connections wait in the accept queue.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!("gateway: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let clock = Arc::new(Clock {
            wait: Mutex::new(Wait {
                since: Instant::now(),
                first_byte: None,
            }),
            limits,
        });
        let io = TokioIo::new(Watched {
            io: tcp,
            clock: clock.clone(),
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(ConnTimer(clock))
            .header_read_timeout(limits.idle_timeout)
            .keep_alive(true)
            .serve_connection(io, service.clone());
        let conn = graceful.watch(conn);
        let (connections, timeouts) = (connections.clone(), timeouts.clone());
        connections.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    timeouts.inc();
                    tracing::debug!(
                        "gateway: a client that sent no complete request was disconnected"
                    );
                } else {
                    tracing::debug!("gateway: connection ended: {e}");
                }
            }
            connections.dec();
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => {
            tracing::warn!("gateway: requests still running after {} s of shutdown", drain.as_secs());
        }
    }
}
