//! The HTTP connections: how many, for how long, and who gives way.
//!
//! A scrape must get through whatever other clients do (a local user can
//! open thousands of connections that send nothing, finish a TLS handshake
//! and go quiet, or ask for /metrics and never read the answer). So:
//! - many connections are served (a few thousand, within the open-file
//!   limit), and none waits for a slot: at the bound, the connection that
//!   has been idle the longest (no request in progress: waiting for its
//!   request head or its TLS handshake) is closed to make room;
//! - TLS handshakes run in the connection's own task, at most
//!   `max_handshakes` at once (at the bound the oldest is dropped), each
//!   within `handshake_timeout`;
//! - a request head must arrive within `header_read_timeout` of the
//!   connection (or the previous response), a write must make progress
//!   within `write_timeout`, and an answer must be ready within
//!   `request_timeout`;
//! - at most `max_requests` requests that read the kernel's tables run at
//!   once; more wait `slot_wait` at most, then get 503.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, http::StatusCode, response::IntoResponse as _};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Notify, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::write_timeout::WriteTimeout;

/// Limits that keep one client from hurting the others.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once, in any phase (see [`Limits::fit_fd_limit`]).
    pub max_connections: usize,
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
    /// A client must send its request head within this time of connecting
    /// (after the handshake) or of its previous response.
    pub header_read_timeout: Duration,
    /// A response write that makes no progress for this long ends the
    /// connection (a client that does not read).
    pub write_timeout: Duration,
    /// Requests that read the kernel's tables (`/metrics`,
    /// `/api/v1/snapshot`) handled at once; `/`, `/healthz` and `/readyz`
    /// are not counted.
    pub max_requests: usize,
    /// How long such a request waits for its turn before a 503.
    pub slot_wait: Duration,
    /// A request must be answered within this time (408 otherwise).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_requests: 64,
            slot_wait: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// File descriptors kept for everything but connections: the BPF maps,
/// programs and links (about 150 with every hook), the walks' iterators,
/// netns handles with `--all-netns`, logs.
const RESERVED_FDS: u64 = 512;

impl Limits {
    /// Raises the soft open-file limit toward what `max_connections` needs
    /// (within the hard limit; a service manager may forbid it, then the
    /// limit stays), and lowers `max_connections` to what the limit holds:
    /// accepting into EMFILE would stall the accept loop.
    pub fn fit_fd_limit(mut self) -> Self {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit into a live local.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return self;
        }
        let want = self.max_connections as u64 + RESERVED_FDS;
        if lim.rlim_cur < want && lim.rlim_max > lim.rlim_cur {
            let raised = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
            // SAFETY: setrlimit reads one live rlimit; failure leaves the limit.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
        let fit = usize::try_from(lim.rlim_cur.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX).max(16);
        if fit < self.max_connections {
            // Not a warning: the daemon works, idle clients give way sooner.
            info!(
                open_files = lim.rlim_cur,
                connections = fit,
                "the open-file limit allows fewer HTTP connections than {} (raise LimitNOFILE= / ulimit -n)",
                self.max_connections
            );
            self.max_connections = fit;
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// TLS handshake in progress.
    Handshake,
    /// Waiting for a request head.
    Idle,
    /// A request in progress.
    Busy,
}

struct Entry {
    phase: Phase,
    since: Instant,
    shed: Arc<Notify>,
}

/// The open connections and what each is doing, to choose whom to close.
#[derive(Default)]
struct Table {
    next: u64,
    conns: HashMap<u64, Entry>,
}

impl Table {
    /// The longest in one of `phases`, if any.
    fn oldest(&self, phases: &[Phase]) -> Option<u64> {
        self.conns.iter().filter(|(_, e)| phases.contains(&e.phase)).min_by_key(|(_, e)| e.since).map(|(id, _)| *id)
    }

    /// Sheds up to `n` of the longest idle (or handshaking); how many.
    fn shed_idle(&mut self, n: usize) -> usize {
        let mut idle: Vec<(Instant, u64)> = self
            .conns
            .iter()
            .filter(|(_, e)| e.phase != Phase::Busy)
            .map(|(id, e)| (e.since, *id))
            .collect();
        idle.sort_unstable();
        idle.truncate(n);
        for (_, id) in &idle {
            self.shed(*id);
        }
        idle.len()
    }

    fn shed(&mut self, id: u64) {
        if let Some(e) = self.conns.remove(&id) {
            e.shed.notify_one();
        }
    }

    /// Room for one more connection starting in `phase`: sheds the longest
    /// idle (or handshaking) one at `max`, the oldest handshake at
    /// `max_handshakes`. None when every connection has a request running.
    fn admit(&mut self, phase: Phase, max: usize, max_handshakes: usize, now: Instant) -> Option<(u64, Arc<Notify>)> {
        if self.conns.len() >= max {
            let victim = self.oldest(&[Phase::Idle, Phase::Handshake])?;
            self.shed(victim);
        }
        if phase == Phase::Handshake
            && self.conns.values().filter(|e| e.phase == Phase::Handshake).count() >= max_handshakes
            && let Some(victim) = self.oldest(&[Phase::Handshake])
        {
            self.shed(victim);
        }
        let id = self.next;
        self.next += 1;
        let shed = Arc::new(Notify::new());
        self.conns.insert(id, Entry { phase, since: now, shed: shed.clone() });
        Some((id, shed))
    }

    fn set(&mut self, id: u64, phase: Phase, now: Instant) {
        if let Some(e) = self.conns.get_mut(&id) {
            (e.phase, e.since) = (phase, now);
        }
    }
}

#[derive(Default)]
struct Registry(Mutex<Table>);

impl Registry {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One admitted connection; leaves the table when dropped.
struct Slot {
    reg: Arc<Registry>,
    id: u64,
}

impl Slot {
    fn set(&self, phase: Phase) {
        self.reg.table().set(self.id, phase, Instant::now());
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.reg.table().conns.remove(&self.id);
    }
}

/// The connection is busy while a request runs; idle (sheddable) again
/// once its answer is ready.
struct BusyGuard(Arc<Slot>);

impl BusyGuard {
    fn new(slot: Arc<Slot>) -> Self {
        slot.set(Phase::Busy);
        Self(slot)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.set(Phase::Idle);
    }
}

/// Idle connections closed at once when accept() fails.
const ACCEPT_ERROR_SHED: usize = 32;

/// hyper's smallest read buffer: a request whose headers do not fit gets 431.
const MAX_REQUEST_HEAD: usize = 8192;

/// Whether a request reads the kernel's tables (and so takes a turn).
fn reads_tables(path: &str) -> bool {
    !matches!(path, "/" | "/healthz" | "/readyz")
}

/// Serves `app` on `listener`, through TLS when `tls` is set, until `stop`;
/// then lets requests in flight finish for up to 2 s.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::{rt::TokioTimer, server::graceful::GracefulShutdown};
    let app = app.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        limits.request_timeout,
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(true);
    let http = Arc::new(http);
    let reg = Arc::new(Registry::default());
    let turns = Arc::new(Semaphore::new(limits.max_requests));
    let graceful = GracefulShutdown::new();
    info!(
        max_connections = limits.max_connections,
        max_tls_handshakes = limits.max_handshakes,
        "HTTP connection limits"
    );
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            c = listener.accept() => match c {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    // Out of file descriptors (EMFILE/ENFILE: the limit was
                    // lowered, or something else holds them) or memory: make
                    // room by closing the longest idle connections, a batch
                    // at a time (the accept queue behind may hold a scrape).
                    debug!(error = %e, "accept failed");
                    if reg.table().shed_idle(ACCEPT_ERROR_SHED) > 0 {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let phase = if tls.is_some() { Phase::Handshake } else { Phase::Idle };
        let admitted = reg.table().admit(phase, limits.max_connections, limits.max_handshakes, Instant::now());
        let Some((id, shed)) = admitted else {
            // Every connection has a request running: this one is closed.
            debug!("connection refused: every connection is busy");
            continue;
        };
        let slot = Arc::new(Slot { reg: reg.clone(), id });
        let io = WriteTimeout::new(tcp, limits.write_timeout);
        let (tls, http, app, turns, watcher) = (tls.clone(), http.clone(), app.clone(), turns.clone(), graceful.watcher());
        tokio::spawn(async move {
            let work = async {
                match tls {
                    None => serve_one(io, &http, app, slot, turns, limits, watcher).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)).await {
                            Ok(Ok(tls)) => {
                                slot.set(Phase::Idle);
                                serve_one(tls, &http, app, slot, turns, limits, watcher).await;
                            }
                            Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                            Err(_) => debug!("TLS handshake timed out"),
                        }
                    }
                }
            };
            // Shed: dropping the work closes the connection.
            tokio::select! {
                () = work => {}
                () = shed.notified() => debug!("connection shed to make room"),
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

/// One connection, after its handshake: HTTP/1.1 until either side ends it.
async fn serve_one<I>(
    io: I,
    http: &hyper::server::conn::http1::Builder,
    app: Router,
    slot: Arc<Slot>,
    turns: Arc<Semaphore>,
    limits: Limits,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper::service::Service as _;
    let app = hyper_util::service::TowerToHyperService::new(app);
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (slot, turns) = (slot.clone(), turns.clone());
        let heavy = reads_tables(req.uri().path());
        // Lazy: nothing runs before it is polled, after the turn is taken.
        let answer = app.call(req);
        async move {
            let _busy = BusyGuard::new(slot);
            let _turn = if heavy {
                match tokio::time::timeout(limits.slot_wait, turns.acquire_owned()).await {
                    Ok(Ok(p)) => Some(p),
                    _ => {
                        let busy = (StatusCode::SERVICE_UNAVAILABLE, "busy: too many requests at once, try again\n");
                        return Ok::<_, std::convert::Infallible>(busy.into_response());
                    }
                }
            } else {
                None
            };
            answer.await
        }
    });
    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    // Errors here are the client's (reset, timeout, bad request).
    let _ = watcher.watch(conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_bound_the_longest_idle_gives_way() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = Table::default();
        let (busy, _) = t.admit(Phase::Idle, 3, 2, at(0)).unwrap();
        t.set(busy, Phase::Busy, at(1));
        let (old, _) = t.admit(Phase::Idle, 3, 2, at(2)).unwrap();
        let (young, _) = t.admit(Phase::Idle, 3, 2, at(3)).unwrap();
        // Full: the idle one from t=2 goes, not the busy one from t=0.
        let (new, _) = t.admit(Phase::Idle, 3, 2, at(4)).unwrap();
        assert!(t.conns.contains_key(&busy) && t.conns.contains_key(&young) && t.conns.contains_key(&new));
        assert!(!t.conns.contains_key(&old));
        // Every connection busy: the newcomer is refused.
        t.set(young, Phase::Busy, at(5));
        t.set(new, Phase::Busy, at(5));
        assert!(t.admit(Phase::Idle, 3, 2, at(6)).is_none());
    }

    #[test]
    fn handshakes_are_bounded_oldest_first() {
        let t0 = Instant::now();
        let mut t = Table::default();
        let (a, a_shed) = t.admit(Phase::Handshake, 100, 2, t0).unwrap();
        let (b, _) = t.admit(Phase::Handshake, 100, 2, t0 + Duration::from_secs(1)).unwrap();
        let (c, _) = t.admit(Phase::Handshake, 100, 2, t0 + Duration::from_secs(2)).unwrap();
        assert!(!t.conns.contains_key(&a) && t.conns.contains_key(&b) && t.conns.contains_key(&c));
        // The shed connection's task is told (a permit waits for it).
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(1), a_shed.notified()).await.unwrap() });
    }
}
