//! Who may connect over TCP: the credentials file behind `--credentials` (docs/CHAT.md 6.2).
//!
//! One entry per line, `#` starts a comment:
//!
//! ```text
//! gateway CLUSTER_ID TOKEN   # the gateway nodes of cluster CLUSTER_ID
//! agent TOKEN                # agent tools (any number of agent lines)
//! ```
//!
//! With the file, a Hello must carry its role's token: a gateway the token of the cluster it
//! declares (so only that cluster's nodes can raise its epoch, fence it, or resume its
//! participants), an agent tool an agent token. Without the file every Hello is accepted, as
//! before protocol 3; the server warns at start.

use std::collections::HashMap;
use std::path::Path;

use bgs_proto::chat::{ChatErrorCode, ClientRole, Secret};

use crate::error::{refuse, ChatServerError, Result};

/// Tokens shorter than this are refused at start: a guessable token is no credential.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Default)]
pub struct Credentials {
    gateways: HashMap<String, Secret>,
    agents: Vec<Secret>,
}

impl Credentials {
    /// Reads and checks the file; the error names the file and line, never a token.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ChatServerError::Config(format!("--credentials {}: {e}", path.display()))
        })?;
        Self::parse(&text)
            .map_err(|m| ChatServerError::Config(format!("--credentials {}: {m}", path.display())))
    }

    /// Parses the file's text (what [`Credentials::load`] does after reading it).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut creds = Self::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let token = match words.as_slice() {
                ["gateway", cluster, token] => {
                    crate::check::check_id("cluster_id", cluster)
                        .map_err(|e| format!("line {}: {}", n + 1, e.to_chat_error().message))?;
                    if creds.gateways.contains_key(*cluster) {
                        return Err(format!("line {}: cluster {cluster} is listed twice", n + 1));
                    }
                    creds
                        .gateways
                        .insert((*cluster).to_string(), Secret::new(*token));
                    token
                }
                ["agent", token] => {
                    creds.agents.push(Secret::new(*token));
                    token
                }
                _ => {
                    return Err(format!(
                        "line {}: expected `gateway CLUSTER_ID TOKEN` or `agent TOKEN`",
                        n + 1
                    ))
                }
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {}: the token is shorter than {MIN_TOKEN_LEN} characters",
                    n + 1
                ));
            }
        }
        if creds.gateways.is_empty() && creds.agents.is_empty() {
            return Err("no `gateway` or `agent` line".into());
        }
        Ok(creds)
    }

    /// Accepts an HTTP request's bearer token as an agent token (transcripts and userdata).
    pub fn check_bearer(&self, bearer: Option<&str>) -> Result<()> {
        let credential = Secret::new(bearer.unwrap_or(""));
        self.check(&ClientRole::Agent, &credential).map_err(|_| {
            ChatServerError::refused(
                ChatErrorCode::Unauthorized,
                "this needs `Authorization: Bearer <token>` with an agent token of --credentials",
            )
        })
    }

    /// Accepts a Hello's credential for its role, or refuses it with `unauthorized`.
    pub fn check(&self, role: &ClientRole, credential: &Secret) -> Result<()> {
        let ok = match role {
            ClientRole::Gateway { cluster_id, .. } => self
                .gateways
                .get(cluster_id)
                .is_some_and(|want| want.matches(credential.expose())),
            // Every agent token is compared, so the time does not tell which one matched.
            ClientRole::Agent => self
                .agents
                .iter()
                .fold(false, |ok, want| want.matches(credential.expose()) | ok),
        };
        if ok {
            return Ok(());
        }
        let what = match role {
            ClientRole::Gateway { cluster_id, .. } => format!("gateway of cluster {cluster_id}"),
            ClientRole::Agent => "agent".into(),
        };
        let why = if credential.is_empty() {
            "no credential"
        } else {
            "a wrong credential"
        };
        refuse(
            ChatErrorCode::Unauthorized,
            format!("Hello as {what} with {why}: this server needs the token it is configured with (--credentials)"),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn gateway(cluster: &str) -> ClientRole {
        ClientRole::Gateway {
            cluster_id: cluster.into(),
            epoch: 1,
            node_id: "n".into(),
        }
    }

    #[test]
    fn a_token_opens_only_its_own_role_and_cluster() {
        let c = Credentials::parse(
            "# pair A\ngateway bgs aaaaaaaaaaaaaaaa-1\n\ngateway other bbbbbbbbbbbbbbbb-2 # B\nagent cccccccccccccccc-3\n",
        )
        .unwrap();
        assert!(c
            .check(&gateway("bgs"), &Secret::new("aaaaaaaaaaaaaaaa-1"))
            .is_ok());
        assert!(c
            .check(&gateway("other"), &Secret::new("bbbbbbbbbbbbbbbb-2"))
            .is_ok());
        assert!(c
            .check(&ClientRole::Agent, &Secret::new("cccccccccccccccc-3"))
            .is_ok());
        // Another cluster's token, an agent token, none, and an unknown cluster are refused.
        for (role, token) in [
            (gateway("bgs"), "bbbbbbbbbbbbbbbb-2"),
            (gateway("bgs"), "cccccccccccccccc-3"),
            (gateway("bgs"), ""),
            (gateway("unknown"), "aaaaaaaaaaaaaaaa-1"),
            (ClientRole::Agent, "aaaaaaaaaaaaaaaa-1"),
            (ClientRole::Agent, ""),
        ] {
            let e = c.check(&role, &Secret::new(token)).unwrap_err();
            let e = e.to_chat_error();
            assert_eq!(e.code, ChatErrorCode::Unauthorized);
            assert!(!e.message.contains("aaaa"), "no token in {}", e.message);
        }
    }

    #[test]
    fn a_bad_file_is_refused_with_its_line_and_without_the_token() {
        for (text, want) in [
            ("gateway bgs\n", "line 1: expected"),
            ("agent short\n", "line 1: the token is shorter"),
            (
                "\ngateway b/d aaaaaaaaaaaaaaaa\n",
                "line 2: cluster_id must be",
            ),
            (
                "gateway a aaaaaaaaaaaaaaaa\ngateway a bbbbbbbbbbbbbbbb\n",
                "line 2: cluster a is listed twice",
            ),
            ("# nothing\n", "no `gateway` or `agent` line"),
        ] {
            let e = Credentials::parse(text).err().unwrap();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("aaaaaaaaaaaaaaaa"), "{e}");
        }
    }
}
