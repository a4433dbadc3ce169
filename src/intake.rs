//! ESP intake shared by the HTTP and TCP transports: authorization, the processing timeout
//! (`settings.esp-proc-timeout`) and the hand-over to the Supervisor.

use std::time::Duration;

use actix::Addr;
use bgs_actors::esp::{ErrorCode, EspError};
use bgs_actors::metrics::{metrics, Kind};
use bgs_actors::supervisor::{Esp, Supervisor};
use bgs_proto::chat::constant_time_eq;
use bgs_proto::esp::{EspRequest, EspResponse};

pub struct Intake {
    pub node_id: String,
    pub supervisor: Addr<Supervisor>,
    pub timeout: Duration,
    pub token: Option<String>,
}

impl Intake {
    /// Checks a client's token against `auth.token`; a refusal is counted for `port`
    /// (`bgs_connections_refused`).
    pub fn authorize(&self, token: Option<&str>, port: &'static str) -> Result<(), EspError> {
        match (&self.token, token) {
            (None, _) => Ok(()),
            (Some(want), Some(got)) if constant_time_eq(want.as_bytes(), got.as_bytes()) => Ok(()),
            (Some(_), _) => {
                metrics().refused.inc([port, "unauthorized"]);
                Err(EspError::new(
                    ErrorCode::Unauthorized,
                    "a valid bearer token is required",
                ))
            }
        }
    }

    /// Hands a request to the Supervisor; a request not answered within the timeout gets
    /// `timeout`, a full Supervisor mailbox waits (bounded by the same timeout).
    pub async fn dispatch(&self, request: EspRequest) -> EspResponse {
        let id = request.request_id;
        let method = request.method.clone();
        let started = std::time::Instant::now();
        let response = self.hand_over(request, id, &method).await;
        let m = metrics();
        // Only the four methods become label values; anything else is counted as "other".
        let label = match method.as_str() {
            "StartBot" | "StopBot" | "SendDataToBot" | "GetBotStatus" => method.as_str(),
            _ => "other",
        };
        let result = response.code.as_deref().unwrap_or("ok");
        m.esp_requests.inc(&[label, result]);
        m.esp_seconds.observe(label, started.elapsed());
        response
    }

    async fn hand_over(&self, request: EspRequest, id: u64, method: &str) -> EspResponse {
        metrics().queued(Kind::Supervisor);
        match tokio::time::timeout(self.timeout, self.supervisor.send(Esp(request))).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                EspError::new(ErrorCode::Internal, format!("supervisor unavailable: {e}"))
                    .into_response(id)
            }
            Err(_) => {
                tracing::warn!(%method, timeout_secs = self.timeout.as_secs(), "ESP request timed out");
                EspError::new(
                    ErrorCode::Timeout,
                    format!(
                        "not processed within esp-proc-timeout ({} s)",
                        self.timeout.as_secs()
                    ),
                )
                .into_response(id)
            }
        }
    }
}
