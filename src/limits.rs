//! Connection caps that fit the process's file-descriptor limit, so that a flood on one port
//! never leaves the node without descriptors for health checks, admin requests, the Chat Server
//! link, the HA link and plugin processes (docs/CONFIG.md 15).

use crate::net::ESP_PENDING_MAX;

/// Descriptors kept for everything but the capped ports: the Chat Server and HA links, the HA
/// handshakes, plugin pipes, the report and log files, and the accepts that answer `capacity`.
pub const FD_RESERVE: usize = 256;

/// Descriptors one HTTP connection takes once it has spoken: the client's socket at the gate,
/// and both ends of its Unix socket to the HTTP server (src/gate.rs).
pub const HTTP_FDS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// Framed ESP connections past their Hello.
    pub esp: usize,
    /// HTTP connections.
    pub http: usize,
}

impl ConnectionCaps {
    /// The configured caps, or, when they and [`FD_RESERVE`] and [`ESP_PENDING_MAX`] do not fit
    /// in `open_files`, smaller ones in the same proportion that do (with a warning).
    pub fn fit(esp: usize, http: usize, open_files: Option<u64>) -> ConnectionCaps {
        let wanted = ConnectionCaps { esp, http };
        let Some(limit) = open_files.and_then(|n| usize::try_from(n).ok()) else {
            return wanted;
        };
        let reserve = FD_RESERVE + ESP_PENDING_MAX;
        if esp + http * HTTP_FDS + reserve <= limit {
            return wanted;
        }
        let room = limit.saturating_sub(reserve).max(4 * HTTP_FDS);
        let esp_fit = (room * esp / (esp + http * HTTP_FDS)).clamp(2, room - 2 * HTTP_FDS);
        let fitted = ConnectionCaps {
            esp: esp_fit,
            http: (room - esp_fit) / HTTP_FDS,
        };
        tracing::warn!(
            open_files_limit = limit,
            esp_max_connections = fitted.esp,
            http_max_connections = fitted.http,
            "node.esp-max-connections and node.http-max-connections do not fit the open-files limit with room for the rest; using smaller caps (raise LimitNOFILE or ulimit -n)"
        );
        fitted
    }
}

/// The soft limit on open files (`Max open files` in /proc/self/limits), where it can be read.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_that_fit_are_kept_and_others_shrink_to_leave_the_reserve() {
        let kept = ConnectionCaps::fit(1000, 1000, Some(65536));
        assert_eq!((kept.esp, kept.http), (1000, 1000));
        assert_eq!(ConnectionCaps::fit(1000, 1000, None).esp, 1000);
        // The 1024 of a default shell: both caps together leave the reserve free (an HTTP
        // connection takes three descriptors).
        let small = ConnectionCaps::fit(1000, 1000, Some(1024));
        let room = 1024 - FD_RESERVE - ESP_PENDING_MAX;
        assert!(small.esp + HTTP_FDS * small.http <= room, "{small:?}");
        assert!(
            small.esp + HTTP_FDS * small.http > room - HTTP_FDS,
            "{small:?}"
        );
        assert!(small.esp.abs_diff(small.http) <= 1, "{small:?}");
        let skewed = ConnectionCaps::fit(3000, 1000, Some(1024));
        assert!(skewed.esp.abs_diff(3 * skewed.http) <= 3, "{skewed:?}");
        // Absurdly low limits still leave each port a few connections.
        let tiny = ConnectionCaps::fit(1000, 1000, Some(10));
        assert!(tiny.esp >= 2 && tiny.http >= 2, "{tiny:?}");
    }

    #[test]
    fn this_process_has_a_readable_open_files_limit() {
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
