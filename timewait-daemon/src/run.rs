//! The daemon (`timewaitd run`): serve HTTP, attach the probes, drain and walk every second, stop on a signal.
//!
//! HTTP is served at once (/readyz says 503 until the probes are attached
//! and the start-up snapshot is loaded); SIGHUP reloads; SIGTERM/SIGINT stop.

use std::{
    io::IsTerminal as _,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    cli::{
        args::RunArgs,
        config::{self, Config},
    },
    collect::Collector,
    http::server::{AppState, VERSION, router},
    kernel::{
        load::{self, LoadOptions},
        procfs,
    },
};

/// How often the SYN tables are drained and lost events looked for.
const TICK: Duration = Duration::from_secs(1);
/// At most this share of the time goes to walks triggered by lost events
/// (a walk of 100,000 TIME_WAIT takes about 0.2 s: then at most one per 10 s).
const LOSS_WALK_SHARE: f64 = 0.02;

/// When the last reconciliation walk ran, what it took, and whether a lost
/// event still waits for one.
#[derive(Default)]
struct WalkState {
    last: Option<std::time::Instant>,
    cost: Duration,
    owed: bool,
}

use crate::cli::fail;

/// Without segment hooks (the tracepoint path before Linux 6.11) a
/// minisocket's FIN_WAIT2 -> TIME_WAIT change is seen only when its timer
/// is re-armed into another timer-wheel bucket; the kernel skips the
/// tracepoint for a re-arm within the same bucket, often on loopback. Walks
/// re-read substates: there they run at least every this many seconds.
const WALK_WITHOUT_SEGMENTS: Duration = Duration::from_secs(10);

/// The periodic walk's interval: `--reconcile-interval` (0: none), at most
/// [`WALK_WITHOUT_SEGMENTS`] where segments are unavailable.
fn walk_interval(secs: u64, signals: &[crate::kernel::paths::SignalPath]) -> Duration {
    let interval = Duration::from_secs(secs);
    let blind = signals
        .iter()
        .any(|sp| sp.signal == crate::kernel::paths::SEGMENTS && sp.path == crate::kernel::paths::Path::Unavailable);
    if blind && !interval.is_zero() && interval > WALK_WITHOUT_SEGMENTS {
        info!(
            every_secs = WALK_WITHOUT_SEGMENTS.as_secs(),
            "segments unavailable: reconciliation walks re-read FIN_WAIT2 -> TIME_WAIT changes more often"
        );
        return WALK_WITHOUT_SEGMENTS;
    }
    interval
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to
/// its `device:inode` (systemd.exec(5)).
fn journal_is_stderr() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

pub fn main(args: &RunArgs) -> ExitCode {
    let args = args.clone();
    let cfg = match config::resolve(&args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if cfg.all_netns
        && let Some(why) = crate::kernel::netns::all_netns_unavailable()
    {
        return fail(why);
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&cfg.log_level) {
        Ok(f) => f,
        Err(e) => return fail(format!("invalid log.level {:?}: {e}", cfg.log_level)),
    };
    // Colour only on a terminal; under systemd (stderr is the journal's
    // stream) no timestamps either, the journal has its own.
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if journal_is_stderr() {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    rt.block_on(serve(cfg, args))
}

/// SIGHUP: read the flags and the config file again. Aggregation settings
/// apply at once; a file that does not parse keeps the running configuration
/// (and says why); settings fixed at start-up say that they need a restart.
fn reload(args: &RunArgs, running: &Config, state: &AppState) {
    let new = match config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "SIGHUP: configuration not reloaded, keeping the running one");
            return;
        }
    };
    let fixed = [
        ("web.listen-address", new.listen != running.listen),
        ("web.config.file", new.web_config_file != running.web_config_file),
        ("all-netns", new.all_netns != running.all_netns),
        ("attribute-cgroups", new.attribute_cgroups != running.attribute_cgroups),
        ("max-tracked-sockets", new.max_tracked_sockets != running.max_tracked_sockets),
        ("max-series", new.max_series != running.max_series),
        ("log.level", new.log_level != running.log_level),
        ("reconcile-interval", new.reconcile_interval != running.reconcile_interval),
        ("probe-path", new.probe_path != running.probe_path),
        ("syscall-tracepoints", new.syscall_tracepoints != running.syscall_tracepoints),
        ("nat", new.nat != running.nat),
    ];
    for (key, changed) in fixed {
        if changed {
            warn!(key, "SIGHUP: this setting changes only with a restart");
        }
    }
    *state.agg.write().unwrap_or_else(|e| e.into_inner()) = new.agg.clone();
    info!(
        top_remotes = new.agg.top_remotes,
        top_ports = new.agg.top_ports,
        aggregate_ipv4_prefix = new.agg.ipv4_prefix,
        aggregate_ipv6_prefix = new.agg.ipv6_prefix,
        remote_port_range_size = new.agg.remote_port_range_size,
        top_cgroups = new.agg.top_cgroups,
        "SIGHUP: configuration reloaded"
    );
}

async fn serve(cfg: Config, args: RunArgs) -> ExitCode {
    let web = match &cfg.web_config_file {
        Some(path) => match crate::http::tls_auth::load(path) {
            Ok(w) => Some(w),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", cfg.listen)),
    };
    let (tls, auth) = match web {
        Some(w) => (w.tls, w.auth),
        None => (None, None),
    };
    let state = Arc::new(AppState::new(cfg.agg.clone(), procfs::release()));
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot handle SIGTERM: {e}")),
    };
    // Registered now, so that a SIGHUP during start-up waits instead of
    // killing the process (its default action).
    let mut sighup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot handle SIGHUP: {e}")),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let tls_on = tls.is_some();
    let app = router(state.clone(), auth.clone());
    let shutdown = async move {
        let _ = server_stop.wait_for(|s| *s).await;
    };
    let limits = crate::http::conns::Limits::default().fit_fd_limit();
    let server = tokio::spawn(crate::http::conns::serve(listener, tls, app, limits, shutdown));
    info!(
        version = VERSION,
        listen = %cfg.listen,
        tls = tls_on,
        basic_auth = auth.is_some(),
        "serving; attaching probes"
    );

    let opts = LoadOptions::of(&cfg);
    let loading = tokio::task::spawn_blocking(move || load::load(&opts));
    let probes = tokio::select! {
        r = loading => r,
        _ = stop_signal(&mut sigterm) => {
            info!("stopping before the probes were ready");
            let _ = stop_tx.send(true);
            let _ = server.await;
            return ExitCode::SUCCESS;
        }
    };
    let collector = match probes {
        Ok(Ok(p)) => Arc::new(Collector::new(p, cfg.max_series)),
        Ok(Err(e)) => {
            let _ = stop_tx.send(true);
            return fail(e);
        }
        Err(e) => return fail(format!("loader panicked: {e}")),
    };
    let _ = state.collector.set(collector.clone());
    info!("ready");

    // Every second: drain the kernel's gauge and SYN tables; reconcile
    // when an event was lost (at once, unless the walks would then take
    // more than LOSS_WALK_SHARE of the time: a host whose kernel keeps
    // skipping program runs would otherwise walk every second), and every
    // --reconcile-interval seconds anyway.
    let reconciler = {
        let c = collector.clone();
        let app = state.clone();
        let interval = walk_interval(cfg.reconcile_interval, c.signals());
        let state = Arc::new(std::sync::Mutex::new(WalkState::default()));
        let stall = Arc::new(std::sync::Mutex::new(test_stall_drain()));
        every(TICK, stop_rx.clone(), move || {
            if let Some(d) = stall.lock().unwrap_or_else(|e| e.into_inner()).take() {
                warn!(secs = d.as_secs(), "TIMEWAITD_TEST_STALL_DRAIN: stalling this drain, holding its lock");
                c.stall_holding_lock(d);
            }
            c.drain();
            c.refresh_schedule();
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.owed |= c.lost_since_last_look();
            let since = s.last.map_or(Duration::MAX, |t| t.elapsed());
            let due = !interval.is_zero() && since >= interval;
            let spacing = s.cost.mul_f64(1.0 / LOSS_WALK_SHARE).max(TICK);
            let after_loss = s.owed && since >= spacing;
            if !(due || after_loss) {
                return;
            }
            let started = std::time::Instant::now();
            let result = c.reconcile();
            (s.last, s.cost, s.owed) = (Some(started), started.elapsed(), false);
            drop(s);
            if result.is_ok() {
                *app.reconciled_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(started);
            }
            match result {
                Ok(n) if n > 0 => info!(corrected = n, after_loss, "reconciliation corrected the counts"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "reconciliation failed"),
            }
        })
    };
    loop {
        tokio::select! {
            _ = sighup.recv() => reload(&args, &cfg, &state),
            () = stop_signal(&mut sigterm) => break,
        }
    }
    info!("stopping: detaching probes");
    let _ = stop_tx.send(true);
    let _ = reconciler.await;
    // serve() itself gives requests in flight 2 s.
    if tokio::time::timeout(Duration::from_secs(3), server).await.is_err() {
        error!("server did not stop within 3 s");
    }
    // Dropping the last reference detaches every program.
    drop(state);
    drop(collector);
    info!("stopped");
    ExitCode::SUCCESS
}

/// Test-only knob, read once at start: `TIMEWAITD_TEST_STALL_DRAIN=SECS`
/// makes the first drain hold the lock it takes for SECS seconds, as a drain
/// stuck in the kernel would (the health test, tests/kernel/health.rs).
/// Not a flag: nobody should turn it on outside a test.
fn test_stall_drain() -> Option<Duration> {
    let secs: u64 = std::env::var("TIMEWAITD_TEST_STALL_DRAIN").ok()?.parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Runs blocking `job` every `period` (first after one period) until `stop`.
fn every(
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    job: impl Fn() + Clone + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let _ = tokio::task::spawn_blocking(job.clone()).await;
        }
    })
}

async fn stop_signal(sigterm: &mut tokio::signal::unix::Signal) {
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
