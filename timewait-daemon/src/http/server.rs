//! HTTP: /metrics, /healthz, /readyz, /api/v1/snapshot and a landing page.

use std::sync::{Arc, OnceLock};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use super::{
    exposition,
    tls_auth::{BasicAuth, require_auth},
};
use crate::{collect::Collector, model::aggregate::AggOptions};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl AppState {
    pub fn agg(&self) -> AggOptions {
        self.agg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub struct AppState {
    /// Set once the probes are attached and the start-up snapshot is loaded.
    pub collector: OnceLock<Arc<Collector>>,
    /// Aggregation settings; SIGHUP replaces them (see run.rs).
    pub agg: std::sync::RwLock<AggOptions>,
    pub kernel_release: String,
    /// When the last reconciliation walk succeeded (run.rs).
    pub reconciled_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// The NAT side's reader, or why there is none (run.rs).
    pub nat: OnceLock<Result<Arc<crate::nat::reader::NatShared>, String>>,
}

/// A drain runs every second; one this far behind means the task that runs
/// it (drains, then walks) is stuck, and `/healthz` says so.
pub const DRAIN_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl AppState {
    pub fn new(agg: AggOptions, kernel_release: String) -> Self {
        Self {
            collector: OnceLock::new(),
            agg: std::sync::RwLock::new(agg),
            kernel_release,
            reconciled_at: std::sync::Mutex::new(None),
            nat: OnceLock::new(),
        }
    }

    /// The NAT side at a scrape: its view, or why it is not watched.
    pub fn nat_view(&self, agg: &AggOptions) -> Option<crate::nat::reader::NatView> {
        match self.nat.get()? {
            Ok(n) => n.view(agg),
            Err(why) => Some(crate::nat::reader::NatView::not_watched(why.clone(), why.starts_with("--nat off"))),
        }
    }

    fn reconcile_age(&self) -> Option<std::time::Duration> {
        self.reconciled_at.lock().unwrap_or_else(|e| e.into_inner()).map(|t| t.elapsed())
    }
}

pub fn router(state: Arc<AppState>, auth: Option<Arc<BasicAuth>>) -> Router {
    let router = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/snapshot", get(snapshot))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state);
    match auth {
        Some(auth) => router.layer(axum::middleware::from_fn_with_state(auth, require_auth)),
        None => router,
    }
}

fn not_ready() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "not ready: attaching probes and loading the start-up snapshot\n").into_response()
}

/// 200 while the process runs and its drains keep up; 503 with the reason
/// once the last drain is more than [`DRAIN_STALE_AFTER`] old. Reads one
/// atomic: never waits for the lock a stuck drain holds.
async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    if let Some(age) = st.collector.get().and_then(|c| c.last_drain_age())
        && age > DRAIN_STALE_AFTER
    {
        let msg = format!(
            "unhealthy: the kernel's tables were last drained {} s ago (drains run every second; limit {} s): the drain or a walk is stuck\n",
            age.as_secs(),
            DRAIN_STALE_AFTER.as_secs()
        );
        return (StatusCode::SERVICE_UNAVAILABLE, msg).into_response();
    }
    "ok\n".into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    match st.collector.get() {
        Some(_) => "ready\n".into_response(),
        None => not_ready(),
    }
}

async fn metrics_handler(State(st): State<Arc<AppState>>) -> Response {
    let Some(c) = st.collector.get().cloned() else {
        return not_ready();
    };
    let st2 = st.clone();
    let body = tokio::task::spawn_blocking(move || {
        let agg = st2.agg();
        let mut view = c.read(&agg);
        view.nat = st2.nat_view(&agg);
        exposition::render(
            &view,
            &exposition::Static {
                version: VERSION,
                kernel: &st2.kernel_release,
                hooks: c.hooks(),
                signals: c.signals(),
                drain_age: c.last_drain_age(),
                reconcile_age: st2.reconcile_age(),
                read_errors: c.read_errors.load(std::sync::atomic::Ordering::Relaxed),
            },
        )
    })
    .await;
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "collection failed\n").into_response(),
    }
}

async fn snapshot(State(st): State<Arc<AppState>>) -> Response {
    let Some(c) = st.collector.get().cloned() else {
        return not_ready();
    };
    let st2 = st.clone();
    match tokio::task::spawn_blocking(move || {
        let agg = st2.agg();
        let mut view = c.read(&agg);
        view.nat = st2.nat_view(&agg);
        view
    })
    .await
    {
        Ok(view) => axum::Json(view).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "collection failed\n").into_response(),
    }
}

async fn index(State(st): State<Arc<AppState>>) -> Html<String> {
    let hooks = match st.collector.get() {
        Some(c) => c
            .hooks()
            .iter()
            .map(|(h, ok)| format!("<li>{h}: {}</li>", if *ok { "attached" } else { "missing" }))
            .collect::<String>(),
        None => "<li>not ready yet</li>".into(),
    };
    Html(format!(
        "<!doctype html><html><head><title>timewaitd</title></head><body>\
         <h1>timewaitd {VERSION}</h1><p>Kernel {}</p><h2>Hooks</h2><ul>{hooks}</ul>\
         <p><a href=\"/metrics\">Metrics</a> · <a href=\"/api/v1/snapshot\">Snapshot (JSON)</a></p>\
         </body></html>",
        st.kernel_release
    ))
}
