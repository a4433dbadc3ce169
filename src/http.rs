//! The node's HTTP API: `POST /esp` (ESP over JSON), `/healthz`, `/readyz`, `/status`.

use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bgs_actors::chat_link::{ChatLink, GetLinkStatus};
use bgs_actors::esp::{status_of, ErrorCode, EspError};
use bgs_actors::ha::{GetHaStatus, HaCoordinator, Switchover};
use bgs_actors::report::Registry;
use bgs_chat_server::http::BodyError;
use bgs_proto::esp::{EspRequest, EspResponse, EspResult, EspStatus};
use bgs_proto::ha::HaRole;
use serde_json::{json, Value};

use crate::intake::Intake;

pub struct HttpState {
    pub intake: Arc<Intake>,
    pub registry: Arc<Registry>,
    pub link: Addr<ChatLink>,
    pub ha: Addr<HaCoordinator>,
    pub cluster_id: String,
    /// The configured role (a node whose HA coordinator does not answer shows it).
    pub role: HaRole,
    pub started: Instant,
    /// Where Bot Framework bots send their replies.
    pub connector: Arc<crate::plugins::botframework::Connector>,
    /// Time a client has to send a request body (`node.http-read-timeout-ms`).
    pub read_timeout: std::time::Duration,
}

/// The JSON form of an ESP answer and its HTTP status (docs/ESP.md).
pub fn esp_json(r: &EspResponse) -> (StatusCode, Value) {
    if r.status == EspStatus::Error {
        let code = r.code.clone().unwrap_or_else(|| "internal".into());
        let status =
            StatusCode::from_u16(status_of(&code)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = json!({"status": "error", "code": code, "message": r.message});
        if let Some(p) = &r.primary {
            body["primary"] = json!(p);
        }
        return (status, body);
    }
    let result = match &r.result {
        Some(EspResult::Started {
            instance_id,
            participant_id,
        }) => {
            json!({"BotInstanceId": instance_id, "ParticipantId": participant_id})
        }
        Some(EspResult::Stopped { instance_id }) | Some(EspResult::DataSent { instance_id }) => {
            json!({"BotInstanceId": instance_id})
        }
        Some(EspResult::Status { bots }) => json!({"bots": bots}),
        Some(EspResult::Welcome { node_id }) => json!({"node": node_id}),
        None => json!({}),
    };
    (
        StatusCode::OK,
        json!({"status": "ok", "result": result, "userdata": r.userdata}),
    )
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn error(e: EspError) -> HttpResponse {
    let (status, body) = esp_json(&e.into_response(0));
    // Readable by the operator page of the other node too.
    HttpResponse::build(status)
        .insert_header(("Access-Control-Allow-Origin", "*"))
        .json(body)
}

/// Largest request body a route reads (the same as the ESP frame limit).
const MAX_BODY: usize = 1 << 20;

/// Reads a request body of at most [`MAX_BODY`] within the node's HTTP read time (the shared
/// reader, `bgs_chat_server::http::read_body`): 408 when late, 413 when too large, in ESP's
/// error shape.
async fn read_body(
    payload: web::Payload,
    timeout: std::time::Duration,
) -> Result<web::Bytes, HttpResponse> {
    bgs_chat_server::http::read_body(payload.into_inner(), MAX_BODY, timeout)
        .await
        .map_err(|e| match e {
            BodyError::Read(_) => error(EspError::new(ErrorCode::BadRequest, e.to_string())),
            _ => HttpResponse::build(e.status()).json(json!({
                "status": "error", "code": "bad_request", "message": e.to_string()
            })),
        })
}

async fn esp(state: web::Data<HttpState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    if let Err(e) = state.intake.authorize(bearer(&req), "http") {
        return error(e);
    }
    let body = match read_body(payload, state.read_timeout).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let request: EspRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(EspError::new(
                ErrorCode::BadRequest,
                format!("bad ESP JSON: {e}"),
            ))
        }
    };
    let response = state.intake.dispatch(request).await;
    let (status, body) = esp_json(&response);
    HttpResponse::build(status).json(body)
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "alive"}))
}

async fn readyz(state: web::Data<HttpState>) -> HttpResponse {
    if let Ok(ha) = state.ha.send(GetHaStatus).await {
        if ha.draining {
            return HttpResponse::ServiceUnavailable().json(
                json!({"ready": false, "role": "primary", "reason": "draining for a switchover"}),
            );
        }
        if ha.role == HaRole::Backup {
            return if ha.in_sync {
                HttpResponse::Ok().json(json!({"ready": true, "role": "backup"}))
            } else {
                HttpResponse::ServiceUnavailable().json(json!({"ready": false, "role": "backup", "reason": "not in sync with the primary"}))
            };
        }
    }
    match state.link.send(GetLinkStatus).await {
        Ok(link) if link.connected => {
            HttpResponse::Ok().json(json!({"ready": true, "chat_server": link}))
        }
        Ok(link) => HttpResponse::ServiceUnavailable().json(
            json!({"ready": false, "reason": "chat server not connected", "chat_server": link}),
        ),
        Err(_) => HttpResponse::ServiceUnavailable()
            .json(json!({"ready": false, "reason": "chat link stopped"})),
    }
}

async fn status(state: web::Data<HttpState>) -> HttpResponse {
    let link = state.link.send(GetLinkStatus).await.ok();
    let ha = state.ha.send(GetHaStatus).await.ok();
    let by_plugin = state.registry.running_by_plugin();
    HttpResponse::Ok()
        .insert_header(("Access-Control-Allow-Origin", "*"))
        .json(json!({
            "node": state.intake.node_id,
            "cluster": state.cluster_id,
            "role": ha.as_ref().map_or(state.role, |h| h.role).as_str(),
            "epoch": ha.as_ref().map(|h| h.epoch),
            "store": ha.as_ref().and_then(|h| h.store.clone()),
            "ha": ha,
            "uptime_seconds": state.started.elapsed().as_secs(),
            "sessions": state.registry.interaction_count(),
            "bots": by_plugin,
            "chat_servers": link.into_iter().collect::<Vec<_>>(),
        }))
}

/// `GET /admin/bots`: the bots running on this node (`plugin`, `interaction` filter).
async fn bots(
    state: web::Data<HttpState>,
    req: HttpRequest,
    q: web::Query<BotsQuery>,
) -> HttpResponse {
    if let Err(e) = state.intake.authorize(bearer(&req), "http") {
        return error(e);
    }
    let mut bots: Vec<bgs_proto::esp::BotStatus> = Vec::new();
    state.registry.for_each_running(|b| {
        let key = &b.spec.key;
        if q.plugin.as_deref().is_none_or(|p| key.bot_id == p)
            && q.interaction
                .as_deref()
                .is_none_or(|i| key.interaction_id == i)
        {
            bots.push(b.status());
        }
    });
    bots.sort_by(|a, b| {
        (&a.interaction_id, &a.bot_id, &a.bot_name).cmp(&(
            &b.interaction_id,
            &b.bot_id,
            &b.bot_name,
        ))
    });
    HttpResponse::Ok().json(json!({"node": state.intake.node_id, "bots": bots}))
}

#[derive(serde::Deserialize)]
pub struct BotsQuery {
    plugin: Option<String>,
    interaction: Option<String>,
}

/// `GET /`: the operator page (both nodes, sync state, recent role changes, a switchover button).
async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("page.html"))
}

/// CORS preflight for the operator page of the other node.
async fn preflight() -> HttpResponse {
    HttpResponse::NoContent()
        .insert_header(("Access-Control-Allow-Origin", "*"))
        .insert_header(("Access-Control-Allow-Methods", "POST, GET"))
        .insert_header((
            "Access-Control-Allow-Headers",
            "authorization, content-type",
        ))
        .finish()
}

/// `GET /metrics`: the Prometheus text format.
async fn prometheus(state: web::Data<HttpState>) -> HttpResponse {
    let active = state.registry.running_by_plugin();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(bgs_actors::metrics::metrics().render(&active))
}

/// `POST /admin/switchover`: hands the primary role to the backup; answers when done.
async fn switchover(state: web::Data<HttpState>, req: HttpRequest) -> HttpResponse {
    if let Err(e) = state.intake.authorize(bearer(&req), "http") {
        return error(e);
    }
    let started = Instant::now();
    match state.ha.send(Switchover).await {
        Ok(Ok(report)) => HttpResponse::Ok()
            .insert_header(("Access-Control-Allow-Origin", "*"))
            .json(json!({
                "status": "ok", "new_epoch": report.new_epoch, "bots": report.bots,
                "drain_ms": report.drain_ms, "elapsed_ms": started.elapsed().as_millis() as u64,
            })),
        Ok(Err(reason)) => HttpResponse::Conflict()
            .insert_header(("Access-Control-Allow-Origin", "*"))
            .json(json!({"status": "error", "code": "switchover_refused", "message": reason.to_string()})),
        Err(e) => HttpResponse::InternalServerError()
            .json(json!({"status": "error", "code": "internal", "message": e.to_string()})),
    }
}

fn bf_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({"error": {"code": code, "message": message}}))
}

/// The Bot Framework connector's answer to a request it did not take.
fn bf_refused(e: crate::plugins::botframework::ConnectorError) -> HttpResponse {
    use crate::plugins::botframework::{refused, ConnectorError};
    match e {
        ConnectorError::Forbidden => {
            refused("bf_capability");
            bf_error(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "this path is not the serviceUrl of this conversation",
            )
        }
        ConnectorError::Unauthorized(why) => {
            refused("bf_token");
            tracing::info!(reason = %why, "Bot Framework connector request refused: its token");
            bf_error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "the bearer token is missing or not valid for this bot",
            )
        }
        ConnectorError::UnknownConversation => bf_error(
            StatusCode::NOT_FOUND,
            "ConversationNotFound",
            "no bot of this node has this conversation",
        ),
        ConnectorError::Busy => bf_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Throttled",
            "too many replies waiting for this conversation",
        ),
    }
}

/// Whether the connector routes take a request for `conversation`: its capability, the
/// conversation, and the token of a bot with an app id (`Connector::check`).
async fn bf_admit(
    state: &HttpState,
    req: &HttpRequest,
    capability: &str,
    conversation: &str,
) -> Result<(), HttpResponse> {
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    state
        .connector
        .check(capability, conversation, authorization)
        .await
        .map_err(bf_refused)
}

/// The Bot Framework connector: a bot's reply (`POST /bf/{capability}/v3/conversations/{id}/
/// activities` or `.../activities/{activityId}`) to the conversation of one of this node's bots.
/// The capability is the one the bot was given in its `serviceUrl` (anything else: 403), and a
/// bot with an app id sends a valid token (else 401).
async fn bf_activity(
    state: web::Data<HttpState>,
    req: HttpRequest,
    path: web::Path<Vec<String>>,
    payload: web::Payload,
) -> HttpResponse {
    let (Some(capability), Some(conversation)) = (path.first(), path.get(1)) else {
        return bf_error(
            StatusCode::NOT_FOUND,
            "ConversationNotFound",
            "no conversation id",
        );
    };
    if let Err(refused) = bf_admit(&state, &req, capability, conversation).await {
        return refused;
    }
    let body = match read_body(payload, state.read_timeout).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let activity: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return bf_error(
                StatusCode::BAD_REQUEST,
                "BadArgument",
                "the body is not an activity (a JSON object)",
            )
        }
    };
    match state.connector.deliver(conversation, activity, body.len()) {
        Ok(id) => HttpResponse::Ok().json(json!({"id": id})),
        Err(e) => bf_refused(e),
    }
}

/// The Bot Framework connector's attachment upload (`POST /bf/{capability}/v3/conversations/
/// {id}/attachments`, the SDK's `upload_attachment`): a chat has nowhere to keep a file, so the
/// upload is taken (for the bot's flow to go on) and not kept; an activity that then links to it
/// shows the attachment's name, and the node logs that its content was not shown.
async fn bf_attachment(
    state: web::Data<HttpState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> HttpResponse {
    let (capability, conversation) = path.into_inner();
    if let Err(refused) = bf_admit(&state, &req, &capability, &conversation).await {
        return refused;
    }
    if let Err(response) = read_body(payload, state.read_timeout).await {
        return response;
    }
    tracing::warn!("Bot Framework attachment upload taken and not kept: a chat cannot show a file");
    HttpResponse::Ok().json(json!({"id": uuid::Uuid::new_v4().simple().to_string()}))
}

/// The methods [`ROUTES`] serves at `path` (`{name}` segments match any one segment).
pub fn methods_at(path: &str) -> Vec<&'static str> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    ROUTES
        .iter()
        .filter_map(|route| {
            let (method, pattern) = route.split_once(' ')?;
            let pattern: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
            let matches = pattern.len() == segments.len()
                && pattern
                    .iter()
                    .zip(&segments)
                    .all(|(p, s)| p == s || (p.starts_with('{') && p.ends_with('}')));
            matches.then_some(method)
        })
        .collect()
}

/// No route: 405 with `Allow` when the path is served with other methods, else 404.
async fn not_found(req: HttpRequest) -> HttpResponse {
    let allowed = methods_at(req.path());
    // A route's method with a segment the router would not take (an empty one): not found.
    if !allowed.is_empty() && !allowed.contains(&req.method().as_str()) {
        return HttpResponse::MethodNotAllowed()
            .insert_header(("Allow", allowed.join(", ")))
            .json(json!({
                "status": "error", "code": "method_not_allowed",
                "message": format!("{} {} is not served; use {}", req.method(), req.path(), allowed.join(" or "))
            }));
    }
    HttpResponse::NotFound().json(json!({
        "status": "error", "code": "not_found", "message": format!("no route {} {}", req.method(), req.path())
    }))
}

/// Every route [`configure`] serves (docs/openapi.json documents each; a test checks both).
pub const ROUTES: &[&str] = &[
    "POST /esp",
    "GET /healthz",
    "GET /readyz",
    "GET /status",
    "GET /metrics",
    "POST /admin/switchover",
    "GET /admin/bots",
    "POST /bf/{capability}/v3/conversations/{conversation}/activities",
    "POST /bf/{capability}/v3/conversations/{conversation}/activities/{activity}",
    "POST /bf/{capability}/v3/conversations/{conversation}/attachments",
    "GET /",
];

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(1 << 20))
        .route("/esp", web::post().to(esp))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/status", web::get().to(status))
        .route("/metrics", web::get().to(prometheus))
        .route("/admin/bots", web::get().to(bots))
        .route("/admin/switchover", web::post().to(switchover))
        .route(
            "/bf/{capability}/v3/conversations/{conversation}/activities",
            web::post().to(bf_activity),
        )
        .route(
            "/bf/{capability}/v3/conversations/{conversation}/activities/{activity}",
            web::post().to(bf_activity),
        )
        .route(
            "/bf/{capability}/v3/conversations/{conversation}/attachments",
            web::post().to(bf_attachment),
        )
        .route(
            "/admin/switchover",
            web::method(actix_web::http::Method::OPTIONS).to(preflight),
        )
        .route("/", web::get().to(page))
        .default_service(web::to(not_found));
}
