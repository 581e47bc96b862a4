//! HTTP: /metrics, /healthz, /readyz, /api/v1/snapshot and a landing page.

use std::sync::{Arc, OnceLock};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use crate::{aggregate::AggOptions, collector::Collector, metrics};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct AppState {
    /// Set once the probes are attached and the start-up snapshot is loaded.
    pub collector: OnceLock<Arc<Collector>>,
    pub agg: AggOptions,
    pub kernel_release: String,
}

pub fn router(state: Arc<AppState>, auth: Option<Arc<crate::web::BasicAuth>>) -> Router {
    let router = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/snapshot", get(snapshot))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state);
    match auth {
        Some(auth) => router.layer(axum::middleware::from_fn_with_state(auth, crate::web::require_auth)),
        None => router,
    }
}

fn not_ready() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "not ready: attaching probes and loading the start-up snapshot\n").into_response()
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
        let view = c.read(&st2.agg);
        let hooks = c.hooks();
        metrics::render(
            &view,
            &metrics::Static {
                version: VERSION,
                kernel: &st2.kernel_release,
                hooks: &hooks,
                read_errors: c.read_errors.load(std::sync::atomic::Ordering::Relaxed),
                remote_port_range_size: st2.agg.remote_port_range_size,
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
    match tokio::task::spawn_blocking(move || c.read(&st2.agg)).await {
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
