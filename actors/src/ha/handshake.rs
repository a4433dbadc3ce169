//! The HA link handshake's proof: a dialer shows it knows the shared secret with an HMAC-SHA256
//! over the acceptor's nonce, the cluster and its node id (docs/HA.md, "the handshake").

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str, nonce: &[u8; 32], cluster_id: &str, node_id: &str) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(nonce);
    mac.update(cluster_id.as_bytes());
    mac.update(&[0]);
    mac.update(node_id.as_bytes());
    Some(mac)
}

/// Proof that a dialer knows the shared secret: HMAC-SHA256 over the nonce, cluster and node.
pub fn proof(secret: &str, nonce: &[u8; 32], cluster_id: &str, node_id: &str) -> Vec<u8> {
    // HMAC takes keys of any length: `mac` always returns Some.
    mac(secret, nonce, cluster_id, node_id)
        .map(|m| m.finalize().into_bytes().to_vec())
        .unwrap_or_default()
}

/// Checks a proof in constant time.
pub fn verify(
    secret: &str,
    nonce: &[u8; 32],
    cluster_id: &str,
    node_id: &str,
    given: &[u8],
) -> bool {
    mac(secret, nonce, cluster_id, node_id).is_some_and(|m| m.verify_slice(given).is_ok())
}

/// A fresh nonce: 32 bytes from two random version-4 UUIDs.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    n[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    n[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_need_the_secret() {
        let n = [7u8; 32];
        let p = proof("s3cret", &n, "bgs", "bgs-b");
        assert!(verify("s3cret", &n, "bgs", "bgs-b", &p));
        assert!(!verify("other", &n, "bgs", "bgs-b", &p));
        assert!(!verify("s3cret", &n, "bgs", "bgs-c", &p));
        assert!(!verify("s3cret", &[8u8; 32], "bgs", "bgs-b", &p));
    }
}
