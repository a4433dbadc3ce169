//! A small blocking ESP client for `bgs esp`: HTTP/JSON (`POST /esp`) or framed TCP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bgs_proto::codec::{decode, encode_frame, DEFAULT_MAX_FRAME};
use bgs_proto::esp::{
    EspClientFrame, EspHello, EspRequest, EspResponse, EspStatus, ESP_PROTOCOL_VERSION,
};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad answer: {0}")]
    BadAnswer(String),
}

/// Sends one request over HTTP; returns whether it succeeded and the JSON answer.
pub fn over_http(
    url: &str,
    token: Option<&str>,
    request: &EspRequest,
    timeout: Duration,
) -> Result<(bool, Value), ClientError> {
    let body = serde_json::to_string(request).map_err(|e| ClientError::Usage(e.to_string()))?;
    let (status, value) = call(url, "POST", "/esp", Some(&body), token, timeout)?;
    Ok((status == 200, value))
}

/// The CA file `https://` URLs are verified against (a node's `tls.ca-file`).
pub const CA_FILE_ENV: &str = "BGS_CA_FILE";

/// One HTTP/1.1 request to a node (`http://host:port`, or `https://host:port` trusting the CA
/// file named by `BGS_CA_FILE`); returns the status and the JSON.
pub fn call(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Value), ClientError> {
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => {
            return Err(ClientError::Usage(format!(
                "a URL must start with http:// or https:// (got {url:?})"
            )))
        }
    };
    let host = rest.split('/').next().unwrap_or(rest);
    let stream = TcpStream::connect(host).map_err(|source| ClientError::Connect {
        addr: host.to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    if !tls {
        return exchange(stream, host, method, path, body, token);
    }
    let ca = std::env::var_os(CA_FILE_ENV).ok_or_else(|| {
        ClientError::Usage(format!(
            "{url}: set {CA_FILE_ENV} to the CA file that signed the node's certificate"
        ))
    })?;
    let config = bgs_chat_server::tls::client_config(std::path::Path::new(&ca))
        .map_err(ClientError::Usage)?;
    let name_part = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(
        name_part
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|e| ClientError::Usage(format!("{host}: {e}")))?;
    let conn = tokio_rustls::rustls::ClientConnection::new(config, name)
        .map_err(|e| ClientError::Usage(e.to_string()))?;
    exchange(
        tokio_rustls::rustls::StreamOwned::new(conn, stream),
        host,
        method,
        path,
        body,
        token,
    )
}

fn exchange<S: Read + Write>(
    mut stream: S,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Result<(u16, Value), ClientError> {
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS peer that closes without close_notify: what arrived is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::BadAnswer("no HTTP header".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::BadAnswer("no HTTP status".into()))?;
    let value: Value = serde_json::from_str(payload)
        .map_err(|e| ClientError::BadAnswer(format!("{e}: {payload}")))?;
    Ok((status, value))
}

fn read_frame(stream: &mut TcpStream) -> Result<EspResponse, ClientError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > DEFAULT_MAX_FRAME {
        return Err(ClientError::BadAnswer(format!("frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    decode(&payload).map_err(|e| ClientError::BadAnswer(e.to_string()))
}

/// Sends one request over framed TCP; returns the answer.
pub fn over_tcp(
    addr: &str,
    token: Option<&str>,
    request: EspRequest,
    timeout: Duration,
) -> Result<EspResponse, ClientError> {
    let mut stream = TcpStream::connect(addr).map_err(|source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let hello = EspClientFrame::Hello(EspHello {
        version: ESP_PROTOCOL_VERSION,
        client_name: "bgs esp".into(),
        token: token.map(str::to_string),
    });
    let frame = |f: &EspClientFrame| {
        encode_frame(f, DEFAULT_MAX_FRAME).map_err(|e| ClientError::Usage(e.to_string()))
    };
    stream.write_all(&frame(&hello)?)?;
    let welcome = read_frame(&mut stream)?;
    if welcome.status == EspStatus::Error {
        return Ok(welcome);
    }
    stream.write_all(&frame(&EspClientFrame::Request(request))?)?;
    read_frame(&mut stream)
}
