//! The tokens a Bot Framework bot with an app id sends with its replies, checked as a channel
//! (the Bot Connector service) checks them: an RS256 JWT signed by a key of the configured key
//! set or of the OpenID metadata's, issued by an issuer on the list, for the audience
//! `https://api.botframework.com`, not expired (five minutes of clock skew allowed), and for the
//! bot's own app id (its `appid` or `azp` claim). docs/PLUGINS.md section 17.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The audience of the tokens a bot gets for the Bot Connector (scope
/// `https://api.botframework.com/.default`).
pub const AUDIENCE: &str = "https://api.botframework.com";
/// Where Microsoft publishes the Bot Framework's signing keys.
pub const DEFAULT_METADATA: &str =
    "https://login.botframework.com/v1/.well-known/openidconfiguration";
/// The issuers a bot's token may come from: the Bot Framework's, and Entra ID's for the
/// `botframework.com` tenant (v1 and v2 tokens).
pub const DEFAULT_ISSUERS: [&str; 3] = [
    "https://api.botframework.com",
    "https://sts.windows.net/d6d49420-f39b-4df7-a1dc-d59a935871db/",
    "https://login.microsoftonline.com/d6d49420-f39b-4df7-a1dc-d59a935871db/v2.0",
];
/// How long fetched keys are used before they are fetched again.
const KEYS_LIFE: Duration = Duration::from_secs(24 * 3600);
/// An unknown key id fetches the keys again, at most this often.
const REFETCH_AFTER: Duration = Duration::from_secs(300);
/// Largest metadata or key set read.
const MAX_DOCUMENT: usize = 1 << 20;

/// Where the signing keys come from.
enum Keys {
    /// A JWKS file (`token_keys`): fixed.
    Fixed(JwkSet),
    /// OpenID metadata (`openid_metadata`): its `jwks_uri`, fetched and cached.
    Metadata {
        url: String,
        client: reqwest::Client,
        cached: tokio::sync::Mutex<Option<(JwkSet, Instant)>>,
        last_fetch: Mutex<Option<Instant>>,
    },
}

/// What one bot's tokens are checked against.
pub struct TokenCheck {
    app_id: String,
    issuers: Vec<String>,
    keys: Keys,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    appid: Option<String>,
    #[serde(default)]
    azp: Option<String>,
}

impl TokenCheck {
    /// Checks against the keys of a JWKS document (`token_keys`).
    pub fn with_keys(app_id: &str, issuers: Vec<String>, jwks: &str) -> Result<Self, String> {
        let set: JwkSet =
            serde_json::from_str(jwks).map_err(|e| format!("not a JWKS document: {e}"))?;
        if set.keys.is_empty() {
            return Err("the JWKS document has no keys".into());
        }
        Ok(TokenCheck {
            app_id: app_id.to_string(),
            issuers,
            keys: Keys::Fixed(set),
        })
    }

    /// Checks against the keys the OpenID metadata at `url` points to (fetched when first
    /// needed, then daily, or when a token names a key not seen yet).
    pub fn with_metadata(
        app_id: &str,
        issuers: Vec<String>,
        url: String,
        client: reqwest::Client,
    ) -> Self {
        TokenCheck {
            app_id: app_id.to_string(),
            issuers,
            keys: Keys::Metadata {
                url,
                client,
                cached: tokio::sync::Mutex::new(None),
                last_fetch: Mutex::new(None),
            },
        }
    }

    /// Checks the `Authorization` header of a request from the bot.
    pub async fn check(&self, authorization: Option<&str>) -> Result<(), String> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or("no bearer token")?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512
        ) {
            return Err(format!("algorithm {:?} is not accepted", header.alg));
        }
        let kid = header.kid.clone().ok_or("the token names no key (kid)")?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&self.issuers);
        validation.leeway = 300;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| format!("token refused: {e}"))?;
        let app = data.claims.appid.or(data.claims.azp).unwrap_or_default();
        if app != self.app_id {
            return Err(format!(
                "the token is for app {app:?}, not this bot's app id"
            ));
        }
        Ok(())
    }

    /// The decoding key with id `kid`.
    async fn key(&self, kid: &str) -> Result<DecodingKey, String> {
        let find = |set: &JwkSet| {
            set.find(kid)
                .map(|jwk| DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid}: {e}")))
        };
        match &self.keys {
            Keys::Fixed(set) => find(set).unwrap_or_else(|| Err(format!("no key {kid:?}"))),
            Keys::Metadata {
                url,
                client,
                cached,
                last_fetch,
            } => {
                let mut cached = cached.lock().await;
                if let Some((set, at)) = cached.as_ref() {
                    if at.elapsed() < KEYS_LIFE {
                        if let Some(key) = find(set) {
                            return key;
                        }
                    }
                }
                // Fetch (again): keys too old, or a key id not seen yet (keys roll over), at most
                // once per REFETCH_AFTER so that made-up key ids cannot drive fetches.
                let recent = last_fetch
                    .lock()
                    .ok()
                    .and_then(|l| *l)
                    .is_some_and(|t| t.elapsed() < REFETCH_AFTER);
                if recent && cached.is_some() {
                    return Err(format!("no key {kid:?}"));
                }
                if let Ok(mut l) = last_fetch.lock() {
                    *l = Some(Instant::now());
                }
                let set = fetch_keys(client, url).await?;
                let key = find(&set).unwrap_or_else(|| Err(format!("no key {kid:?}")));
                *cached = Some((set, Instant::now()));
                key
            }
        }
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(url).send())
        .await
        .map_err(|_| format!("{url} did not answer in time"))?
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!(
            "{url} answered HTTP {}",
            response.status().as_u16()
        ));
    }
    let bytes = tokio::time::timeout(Duration::from_secs(10), response.bytes())
        .await
        .map_err(|_| format!("{url} did not answer in time"))?
        .map_err(|e| format!("cannot read {url}: {e}"))?;
    if bytes.len() > MAX_DOCUMENT {
        return Err(format!("{url}: larger than {MAX_DOCUMENT} bytes"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{url}: not the JSON expected: {e}"))
}

async fn fetch_keys(client: &reqwest::Client, metadata: &str) -> Result<JwkSet, String> {
    #[derive(Deserialize)]
    struct Metadata {
        jwks_uri: String,
    }
    let m: Metadata = get_json(client, metadata).await?;
    let set: JwkSet = get_json(client, &m.jwks_uri).await?;
    tracing::info!(keys = set.keys.len(), %metadata, "Bot Framework signing keys fetched");
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_without_a_signature_or_a_key_are_refused() {
        let jwks = r#"{"keys":[{"kty":"RSA","kid":"k1","use":"sig","alg":"RS256","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"}]}"#;
        let check =
            TokenCheck::with_keys("app", DEFAULT_ISSUERS.map(String::from).to_vec(), jwks).unwrap();
        for bad in [
            None,
            Some("Basic abc"),
            Some("Bearer "),
            Some("Bearer not.a.jwt"),
            // alg none, with the right claims.
            Some("Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJpc3MiOiJodHRwczovL2FwaS5ib3RmcmFtZXdvcmsuY29tIiwiYXVkIjoiaHR0cHM6Ly9hcGkuYm90ZnJhbWV3b3JrLmNvbSIsImFwcGlkIjoiYXBwIiwiZXhwIjo0MTAyNDQ0ODAwfQ."),
            // HS256 signed with the public key's text (the classic confusion).
            Some("Bearer eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.eyJhcHBpZCI6ImFwcCJ9.c2ln"),
        ] {
            assert!(check.check(bad).await.is_err(), "{bad:?}");
        }
        assert!(TokenCheck::with_keys("app", vec![], "{\"keys\":[]}").is_err());
        assert!(TokenCheck::with_keys("app", vec![], "nope").is_err());
    }
}
