//! The HA link handshake: the proof (a dialer shows it knows the shared secret with an
//! HMAC-SHA256 over the acceptor's nonce, the cluster and its node id; docs/HA.md, "the
//! handshake") and the acceptor's table of handshakes under way.

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

/// Accepted connections that were sent a Challenge and have not answered it: each one's nonce
/// and when it was accepted. Nothing they send but a valid Hello is acted on, they never hold
/// the link slot, and there are at most `max` of them (a new one evicts the oldest: a real
/// backup answers within a round trip, so silent connections cannot keep it out).
#[derive(Debug)]
pub(super) struct Handshakes {
    open: std::collections::BTreeMap<u64, ([u8; 32], u64)>,
    max: usize,
}

impl Handshakes {
    pub(super) fn new(max: usize) -> Self {
        Handshakes {
            open: Default::default(),
            max: max.max(1),
        }
    }

    /// Starts the handshake of `conn`; the connection evicted to make room, if any.
    pub(super) fn admit(&mut self, conn: u64, nonce: [u8; 32], now_ms: u64) -> Option<u64> {
        let evicted = if self.open.len() >= self.max {
            let oldest = self
                .open
                .iter()
                .min_by_key(|(_, (_, since))| *since)
                .map(|(c, _)| *c);
            oldest.inspect(|c| {
                self.open.remove(c);
            })
        } else {
            None
        };
        self.open.insert(conn, (nonce, now_ms));
        evicted
    }

    /// Ends the handshake of `conn` (its first frame arrived): the nonce it must prove.
    pub(super) fn take(&mut self, conn: u64) -> Option<[u8; 32]> {
        self.open.remove(&conn).map(|(nonce, _)| nonce)
    }

    /// Those accepted more than `limit_ms` ago, taken out.
    pub(super) fn late(&mut self, now_ms: u64, limit_ms: u64) -> Vec<u64> {
        let late: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, (_, since))| now_ms.saturating_sub(*since) > limit_ms)
            .map(|(conn, _)| *conn)
            .collect();
        for conn in &late {
            self.open.remove(conn);
        }
        late
    }

    /// Every handshake, taken out.
    pub(super) fn drain(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.open).into_keys().collect()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.open.len()
    }

    #[cfg(test)]
    pub(super) fn has(&self, conn: u64) -> bool {
        self.open.contains_key(&conn)
    }
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

#[cfg(test)]
mod handshakes_tests {
    use super::Handshakes;

    #[test]
    fn the_oldest_handshake_makes_room_and_late_ones_are_closed() {
        let mut h = Handshakes::new(2);
        assert_eq!(h.admit(1, [1; 32], 100), None);
        assert_eq!(h.admit(2, [2; 32], 200), None);
        assert_eq!(h.admit(3, [3; 32], 300), Some(1), "full: the oldest goes");
        assert_eq!(h.take(2), Some([2; 32]));
        assert_eq!(h.take(2), None, "a handshake is answered once");
        h.admit(4, [4; 32], 900);
        assert_eq!(h.late(1000, 500), [3]);
        assert!(h.has(4) && h.len() == 1);
        assert_eq!(h.drain(), [4]);
        assert_eq!(h.len(), 0);
    }
}
