//! HTTP/JSON and WebSocket transport for customers, scripts and browsers (SPEC section 4).
//!
//! Participants created here are stateless: they are identified by their participant id alone and
//! never detach. Errors are `{"error":{"code","message"}}` with a status that fits the code.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use bgs_proto::chat::{
    AfterAction, ChatError, ChatErrorCode, ChatEvent, ParticipantType, PostKind, RichContent,
    Style, Userdata, UserdataChanges, Visibility,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::error::ChatServerError;
use crate::hub::{follow, Actor, Hub};

/// Longest long-poll a client may ask for.
const MAX_WAIT_MS: u64 = 60_000;
/// How long an idle keep-alive connection stays open on both HTTP servers (the Chat Server's
/// and the node's): longer than the head deadline, as clients' pools expect (nginx: 75 s).
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(75);
/// How long a client has to finish a TLS handshake on both HTTPS servers.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
const MAX_BODY: usize = 256 * 1024;

/// An HTTP error in the documented JSON shape.
#[derive(Debug)]
pub struct ApiError(ChatError);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<ChatServerError> for ApiError {
    fn from(e: ChatServerError) -> Self {
        ApiError(e.to_chat_error())
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(ChatError::new(ChatErrorCode::BadRequest, message))
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self.0.code {
            ChatErrorCode::UnknownSession | ChatErrorCode::UnknownParticipant => {
                StatusCode::NOT_FOUND
            }
            ChatErrorCode::SessionExists | ChatErrorCode::SessionClosed => StatusCode::CONFLICT,
            ChatErrorCode::NotAllowed | ChatErrorCode::Fenced => StatusCode::FORBIDDEN,
            ChatErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ChatErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ChatErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ChatErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(json!({
            "error": {"code": self.0.code.as_str(), "message": self.0.message}
        }))
    }
}

type ApiResult = Result<HttpResponse, ApiError>;

fn error_response(status: StatusCode, code: ChatErrorCode, message: String) -> actix_web::Error {
    let body = json!({"error": {"code": code.as_str(), "message": message}});
    actix_web::error::InternalError::from_response("", HttpResponse::build(status).json(body))
        .into()
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// More than the limit arrived (413).
    TooLarge { limit: usize },
    /// It was not complete within the time (408).
    Late { within: Duration },
    /// The connection failed while reading it (400).
    Read(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge { limit } => write!(f, "the body is larger than {limit} bytes"),
            BodyError::Late { within } => write!(
                f,
                "the request body did not arrive within {} ms",
                within.as_millis()
            ),
            BodyError::Read(e) => write!(f, "cannot read the body: {e}"),
        }
    }
}

impl BodyError {
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Late { .. } => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Reads a request body of at most `limit` bytes that must arrive within `within`: a client
/// sending it a byte at a time holds nothing for long, one sending too much is stopped as soon
/// as it has. The one body reader of both HTTP servers (the node's and this one).
pub async fn read_body(
    mut payload: actix_web::dev::Payload,
    limit: usize,
    within: Duration,
) -> Result<web::Bytes, BodyError> {
    use futures_util::StreamExt;
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
            if body.len() + chunk.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| BodyError::Late { within })?
}

/// A JSON body of at most [`MAX_BODY`] bytes that must arrive within `--http-read-timeout`
/// ([`read_body`]): 408 when late, 413 when too large, 400 when not the expected JSON.
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned + 'static> actix_web::FromRequest for Body<T> {
    type Error = actix_web::Error;
    type Future = futures_util::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let within = req
            .app_data::<web::Data<Arc<Hub>>>()
            .map_or(Duration::from_secs(10), |hub| {
                Duration::from_secs(hub.config.http_read_timeout)
            });
        let payload = payload.take();
        Box::pin(async move {
            let body = read_body(payload, MAX_BODY, within).await.map_err(|e| {
                let message = match e {
                    BodyError::Late { .. } => format!("{e} (--http-read-timeout)"),
                    _ => e.to_string(),
                };
                error_response(e.status(), ChatErrorCode::BadRequest, message)
            })?;
            serde_json::from_slice(&body).map(Body).map_err(|e| {
                error_response(
                    StatusCode::BAD_REQUEST,
                    ChatErrorCode::BadRequest,
                    format!("bad body: {e}"),
                )
            })
        })
    }
}

/// An event object without the fields that do not apply (`null`s left out).
pub fn event_json(event: &ChatEvent) -> Value {
    let mut v = serde_json::to_value(event).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.retain(|_, v| !v.is_null());
    }
    v
}

fn events_json(events: &[ChatEvent]) -> Vec<Value> {
    events.iter().map(event_json).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    interaction_id: Option<String>,
    nickname: String,
    #[serde(default)]
    userdata: Userdata,
}

async fn create_session(hub: web::Data<Arc<Hub>>, body: Body<CreateSession>) -> ApiResult {
    let body = body.0;
    let (session_id, participant_id, seq) = hub
        .create_session(body.interaction_id, body.nickname, body.userdata)?
        .durable()
        .await?;
    Ok(HttpResponse::Created().json(json!({
        "session_id": session_id, "participant_id": participant_id, "seq": seq
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Join {
    nickname: String,
    #[serde(rename = "type")]
    participant_type: ParticipantType,
    #[serde(default)]
    visibility: Visibility,
    #[serde(default)]
    style: Style,
}

async fn join(hub: web::Data<Arc<Hub>>, path: web::Path<String>, body: Body<Join>) -> ApiResult {
    let b = body.0;
    let joined = hub
        .join(
            Actor::Http,
            &path,
            b.nickname,
            b.participant_type,
            b.style,
            b.visibility,
        )?
        .durable()
        .await?;
    Ok(
        HttpResponse::Ok()
            .json(json!({"participant_id": joined.participant_id, "seq": joined.seq})),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Post {
    participant_id: String,
    text: String,
    #[serde(default)]
    visibility: Visibility,
    key: Option<String>,
    #[serde(default)]
    kind: PostKind,
    #[serde(default)]
    rich: Option<RichContent>,
}

async fn post(hub: web::Data<Arc<Hub>>, path: web::Path<String>, body: Body<Post>) -> ApiResult {
    let b = body.0;
    let (seq, duplicate) = hub
        .post(
            Actor::Http,
            &path,
            &b.participant_id,
            b.kind,
            b.text,
            b.rich,
            b.visibility,
            b.key,
        )?
        .durable()
        .await?;
    Ok(HttpResponse::Ok().json(json!({"seq": seq, "duplicate": duplicate})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    participant_id: String,
    #[serde(default)]
    since: u64,
    #[serde(default)]
    wait_ms: u64,
}

async fn events(
    hub: web::Data<Arc<Hub>>,
    path: web::Path<String>,
    q: web::Query<EventsQuery>,
) -> ApiResult {
    let session = hub.session(&path)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.min(MAX_WAIT_MS));
    let mut rx = session.subscribe();
    loop {
        rx.borrow_and_update();
        let (events, last_seq, closed) = hub.read(&session, &q.participant_id, q.since)?;
        if !events.is_empty() || closed || tokio::time::Instant::now() >= deadline {
            return Ok(HttpResponse::Ok().json(json!({
                "events": events_json(&events), "last_seq": last_seq, "closed": closed
            })));
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            continue; // deadline: answer with what there is (nothing)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Leave {
    participant_id: String,
    #[serde(default)]
    after_action: AfterAction,
}

async fn leave(hub: web::Data<Arc<Hub>>, path: web::Path<String>, body: Body<Leave>) -> ApiResult {
    let seq = hub
        .leave(
            Actor::Http,
            &path,
            &body.0.participant_id,
            body.0.after_action,
        )?
        .durable()
        .await?;
    Ok(HttpResponse::Ok().json(json!({"seq": seq})))
}

/// The bearer token of a request, if any.
fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

async fn transcript(
    hub: web::Data<Arc<Hub>>,
    req: HttpRequest,
    path: web::Path<String>,
) -> ApiResult {
    hub.authorize_http(bearer(&req))?;
    let (events, closed, userdata) = hub.transcript(&path)?;
    Ok(HttpResponse::Ok().json(json!({
        "session_id": path.as_str(), "events": events_json(&events), "closed": closed, "userdata": userdata
    })))
}

async fn get_userdata(
    hub: web::Data<Arc<Hub>>,
    req: HttpRequest,
    path: web::Path<String>,
) -> ApiResult {
    hub.authorize_http(bearer(&req))?;
    Ok(HttpResponse::Ok().json(hub.userdata(&path)?))
}

async fn patch_userdata(
    hub: web::Data<Arc<Hub>>,
    req: HttpRequest,
    path: web::Path<String>,
    body: Body<UserdataChanges>,
) -> ApiResult {
    hub.authorize_http(bearer(&req))?;
    let userdata = hub
        .update_userdata(Actor::Http, &path, None, body.0)?
        .durable()
        .await?;
    Ok(HttpResponse::Ok().json(userdata))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WsQuery {
    participant_id: String,
    #[serde(default)]
    since: u64,
}

/// A WebSocket of live events for one participant: each text message is one event object. The
/// socket closes after the participant's own `left` event or the session's `closed` event.
async fn websocket(
    hub: web::Data<Arc<Hub>>,
    path: web::Path<String>,
    q: web::Query<WsQuery>,
    req: HttpRequest,
    body: web::Payload,
) -> ApiResult {
    let session = hub.session(&path)?;
    // Check the participant before upgrading, so a wrong id is a plain 404.
    hub.read(&session, &q.participant_id, 0)?;
    let (response, ws, mut incoming) =
        actix_ws::handle(&req, body).map_err(|e| bad_request(e.to_string()))?;
    let cancel = CancellationToken::new();
    let reader_cancel = cancel.clone();
    let mut pong = ws.clone();
    // Answer pings and notice the browser going away.
    actix_web::rt::spawn(async move {
        while let Some(Ok(msg)) = futures_util::StreamExt::next(&mut incoming).await {
            match msg {
                actix_ws::Message::Ping(bytes) if pong.pong(&bytes).await.is_err() => break,
                actix_ws::Message::Close(_) => break,
                _ => {}
            }
        }
        reader_cancel.cancel();
    });
    let participant_id = q.participant_id.clone();
    let since = q.since;
    actix_web::rt::spawn(async move {
        let sender = ws.clone();
        follow(session, participant_id, since, None, cancel.clone(), |events| {
            let mut ws = sender.clone();
            let cancel = cancel.clone();
            async move {
                for e in &events {
                    let text = event_json(e).to_string();
                    let sent = tokio::select! {
                        r = tokio::time::timeout(Duration::from_secs(10), ws.text(text)) => matches!(r, Ok(Ok(()))),
                        _ = cancel.cancelled() => false,
                    };
                    if !sent {
                        return false;
                    }
                }
                true
            }
        })
        .await;
        let _ = ws.close(None).await;
    });
    Ok(response)
}

async fn stats(hub: web::Data<Arc<Hub>>) -> HttpResponse {
    HttpResponse::Ok().json(hub.stats())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("customer.html"))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    HttpResponse::NotFound().json(json!({
        "error": {"code": "not_found", "message": format!("no route {} {}", req.method(), req.path())}
    }))
}

/// The routes, with JSON errors for bad bodies and queries.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let query = web::QueryConfig::default()
        .error_handler(|err, _| bad_request(format!("bad query: {err}")).into());
    cfg.app_data(query)
        .route("/", web::get().to(index))
        .route("/healthz", web::get().to(healthz))
        .route("/stats", web::get().to(stats))
        .route("/sessions", web::post().to(create_session))
        .route("/sessions/{id}/participants", web::post().to(join))
        .route("/sessions/{id}/messages", web::post().to(post))
        .route("/sessions/{id}/events", web::get().to(events))
        .route("/sessions/{id}/leave", web::post().to(leave))
        .route("/sessions/{id}/transcript", web::get().to(transcript))
        .route("/sessions/{id}/userdata", web::get().to(get_userdata))
        .route("/sessions/{id}/userdata", web::patch().to(patch_userdata))
        .route("/sessions/{id}/ws", web::get().to(websocket))
        .default_service(web::to(not_found));
}
