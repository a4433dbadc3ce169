//! `bgs ctl`: what an operator runs against the nodes of a pair (status, bots, switchover).

use std::time::Duration;

use serde_json::{json, Value};

use crate::esp_client::{call, ClientError};

const TIMEOUT: Duration = Duration::from_secs(60);

fn get(url: &str, path: &str, token: Option<&str>) -> Result<Value, ClientError> {
    call(url, "GET", path, None, token, TIMEOUT).map(|(_, v)| v)
}

/// `/status` of every node; a node that cannot be reached is reported as such.
pub fn status(urls: &[String], token: Option<&str>) -> Vec<(String, Result<Value, String>)> {
    urls.iter()
        .map(|u| {
            (
                u.clone(),
                get(u, "/status", token).map_err(|e| e.to_string()),
            )
        })
        .collect()
}

/// A readable table of `status` results.
pub fn status_table(rows: &[(String, Result<Value, String>)]) -> String {
    let mut out = format!(
        "{:<26} {:<8} {:<8} {:>5} {:<6} {:<7} {:>9} {:>8} {:>6}  {}\n",
        "NODE", "ID", "ROLE", "EPOCH", "PEER", "IN-SYNC", "LAG(s)", "SESSIONS", "BOTS", "STORE"
    );
    for (url, r) in rows {
        match r {
            Ok(s) => {
                let bots: u64 = s["bots"]
                    .as_object()
                    .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
                // The durable store: its state and lag, `-` without one.
                let store = match s["store"]["state"].as_str() {
                    Some(state) => format!(
                        "{} {state} {:.3}s",
                        s["store"]["kind"].as_str().unwrap_or("?"),
                        s["store"]["lag_seconds"].as_f64().unwrap_or(0.0)
                    ),
                    None => "-".to_string(),
                };
                out.push_str(&format!(
                    "{:<26} {:<8} {:<8} {:>5} {:<6} {:<7} {:>9.3} {:>8} {:>6}  {}\n",
                    url,
                    s["node"].as_str().unwrap_or("?"),
                    s["role"].as_str().unwrap_or("?"),
                    s["epoch"].as_u64().unwrap_or(0),
                    if s["ha"]["peer_connected"] == true {
                        "up"
                    } else {
                        "down"
                    },
                    if s["ha"]["in_sync"] == true {
                        "yes"
                    } else {
                        "no"
                    },
                    s["ha"]["replication_lag_seconds"].as_f64().unwrap_or(0.0),
                    s["sessions"].as_u64().unwrap_or(0),
                    bots,
                    store,
                ));
            }
            Err(e) => out.push_str(&format!("{url:<26} unreachable: {e}\n")),
        }
    }
    out
}

/// Running bots of every reachable node, filtered.
pub fn bots(
    urls: &[String],
    token: Option<&str>,
    plugin: Option<&str>,
    interaction: Option<&str>,
) -> Result<Vec<Value>, ClientError> {
    let mut query = Vec::new();
    if let Some(p) = plugin {
        query.push(format!("plugin={p}"));
    }
    if let Some(i) = interaction {
        query.push(format!("interaction={i}"));
    }
    let path = if query.is_empty() {
        "/admin/bots".to_string()
    } else {
        format!("/admin/bots?{}", query.join("&"))
    };
    let mut all = Vec::new();
    let mut last_err = None;
    for u in urls {
        match get(u, &path, token) {
            Ok(v) => {
                for b in v["bots"].as_array().cloned().unwrap_or_default() {
                    let mut b = b;
                    b["node"] = v["node"].clone();
                    all.push(b);
                }
            }
            Err(e) => last_err = Some(e),
        }
    }
    match (all.is_empty(), last_err) {
        (true, Some(e)) => Err(e),
        _ => Ok(all),
    }
}

pub fn bots_table(bots: &[Value]) -> String {
    let mut out = format!(
        "{:<8} {:<24} {:<10} {:<12} {:<9} {:<8}\n",
        "NODE", "INTERACTION", "PLUGIN", "NAME", "STATE", "VISIBLE"
    );
    for b in bots {
        out.push_str(&format!(
            "{:<8} {:<24} {:<10} {:<12} {:<9} {:<8}\n",
            b["node"].as_str().unwrap_or(""),
            b["interaction_id"].as_str().unwrap_or(""),
            b["bot_id"].as_str().unwrap_or(""),
            b["bot_name"].as_str().unwrap_or(""),
            b["state"].as_str().unwrap_or(""),
            b["visibility"].as_str().unwrap_or(""),
        ));
    }
    out
}

/// Finds the primary among `urls`, asks it to switch over, and waits until the other node
/// answers as primary. Returns the outcome with timings.
pub fn switchover(urls: &[String], token: Option<&str>) -> Result<Value, String> {
    let rows = status(urls, token);
    let primary = rows
        .iter()
        .find(|(_, r)| r.as_ref().is_ok_and(|s| s["role"] == "primary"))
        .map(|(u, _)| u.clone())
        .ok_or("no reachable node is the primary")?;
    let started = std::time::Instant::now();
    let (code, answer) = call(
        &primary,
        "POST",
        "/admin/switchover",
        Some(""),
        token,
        TIMEOUT,
    )
    .map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(format!(
            "{primary} refused: {}",
            answer["message"].as_str().unwrap_or("?")
        ));
    }
    let handed = started.elapsed();
    let others: Vec<String> = urls.iter().filter(|u| **u != primary).cloned().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let new_primary = loop {
        if let Some(u) = others
            .iter()
            .find(|u| get(u, "/status", token).is_ok_and(|s| s["role"] == "primary"))
        {
            break u.clone();
        }
        if std::time::Instant::now() > deadline {
            return Err("the switchover was handed over but no node reports itself primary".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let unavailable = started.elapsed();
    Ok(json!({
        "status": "ok",
        "old_primary": primary,
        "new_primary": new_primary,
        "new_epoch": answer["new_epoch"],
        "bots": answer["bots"],
        "drain_ms": answer["drain_ms"],
        "handover_ms": handed.as_millis() as u64,
        "esp_unavailable_ms": unavailable.as_millis() as u64,
    }))
}
