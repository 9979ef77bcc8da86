//! The HTTP API (actix-web): the live topology, entity views, health, readiness and metrics.
//! Every error is a JSON body with a 4xx or 503 status.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpResponse};
use aggregator_actors::dedup_actor::{DedupActor, Peek};
use aggregator_actors::metrics::Metrics;
use aggregator_actors::topology::Topology;
use prometheus::{Encoder, TextEncoder};
use serde_json::json;

/// Deepest mailboxes listed by `/topology`.
const BUSIEST_MAILBOXES: usize = 10;

/// How long an offset commit may wait for its answer before `/health` reports it: one takes
/// milliseconds, and the consumer polls nothing while it waits.
const COMMIT_STALL_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    /// Live figures of the actor tree.
    pub topology: Arc<Topology>,
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
    /// The dedup actor, owner of the views.
    pub dedup: Addr<DedupActor>,
    /// Longest entity key accepted.
    pub max_key_bytes: usize,
}

/// A JSON error body with `status`.
fn error(status: actix_web::http::StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message.into() }))
}

/// Registers the routes on an actix-web app.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/topology", web::get().to(topology))
        .route("/entities/{key}", web::get().to(entity))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics))
        .default_service(web::to(|| async {
            error(actix_web::http::StatusCode::NOT_FOUND, "no such endpoint")
        }));
}

async fn topology(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(state.topology.snapshot(BUSIEST_MAILBOXES))
}

async fn entity(state: web::Data<ApiState>, key: web::Path<String>) -> HttpResponse {
    use actix_web::http::StatusCode;
    let key = key.into_inner();
    if key.is_empty() || key.len() > state.max_key_bytes {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "entity key must be 1 to {} bytes, got {}",
                state.max_key_bytes,
                key.len()
            ),
        );
    }
    if key.chars().any(char::is_control) {
        return error(StatusCode::BAD_REQUEST, "entity key has control characters");
    }
    match state.dedup.send(Peek { key: key.clone() }).await {
        Ok(Ok(Some(view))) => match serde_json::to_vec(&view) {
            Ok(body) => HttpResponse::Ok()
                .content_type(actix_web::http::header::ContentType::json())
                .body(body),
            // A part of the view still as stored whose bytes are damaged: decoded only now.
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the view of {key:?} does not decode: {e}"),
            ),
        },
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, format!("no entity with key {key:?}")),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the store is not running"),
    }
}

async fn health(state: web::Data<ApiState>) -> HttpResponse {
    let t = &state.topology;
    let mut faults = serde_json::Map::new();
    if let Some(f) = t.dedup.fault() {
        faults.insert("store".into(), f.into());
    }
    let last_commit_fault = t.committer.last_fault.lock().ok().and_then(|f| f.clone());
    if let Some(f) = last_commit_fault.or_else(|| t.committer.stalled(COMMIT_STALL_AFTER)) {
        faults.insert("commit".into(), f.into());
    }
    let brokers_down = t.brokers_down.lock().ok().and_then(|f| f.clone());
    let consumer_fault = t.consumer_fault.lock().ok().and_then(|f| f.clone());
    if let Some(f) = brokers_down.or(consumer_fault) {
        faults.insert("broker".into(), f.into());
    }
    if faults.is_empty() {
        HttpResponse::Ok().json(json!({ "status": "ok", "faults": faults }))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({ "status": "degraded", "faults": faults }))
    }
}

async fn ready(state: web::Data<ApiState>) -> HttpResponse {
    if state.topology.joined.load(Ordering::Relaxed) {
        HttpResponse::Ok().json(json!({ "ready": true }))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(json!({ "ready": false, "reason": "not yet assigned partitions" }))
    }
}

async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    let m = &state.metrics;
    m.lag.reset();
    for p in state.topology.partitions.iter() {
        if let Some(lag) = p.lag() {
            m.lag
                .with_label_values(&[&*p.tp.topic, &p.tp.partition.to_string()])
                .set(lag);
        }
    }
    m.mailbox_depth
        .set(state.topology.entities.mailbox_total() as i64);
    let mut out = Vec::new();
    match TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(out),
        Err(e) => error(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        ),
    }
}
