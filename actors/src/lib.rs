#![warn(unreachable_pub)]
//! bgs actors: the Supervisor (ESP intake), one SessionActor per chat session, one BotActor per
//! bot instance, a ChatLink per Chat Server connection, and the bot API plugins implement.
//!
//! This crate knows actors and typed messages; sockets and framing live in `src` (see
//! [`chat_link::ChatConnector`]). docs/ARCHITECTURE.md draws the map.

pub mod bot;
pub mod bot_actor;
pub mod bot_limits;
pub mod chat_link;
pub mod delivery;
pub mod esp;
pub mod ha;
pub mod messages;
pub mod metrics;
pub mod plugin_guard;
pub mod report;
pub mod role;
pub mod session;
#[cfg(test)]
mod sim;
pub mod store;
pub mod supervisor;
#[cfg(test)]
mod testing;

/// Frees `value` on a thread of its own: for the maps of 100 000 bots a demotion lets go of, so
/// the thread that carries ESP and the HA link does not spend tens of ms in `free`.
pub(crate) fn drop_later<T: Send + 'static>(value: T) {
    let spawned = std::thread::Builder::new()
        .name("bgs-free".into())
        .spawn(move || drop(value));
    if let Err(e) = spawned {
        // No thread to be had: the value was dropped with the closure; nothing is lost.
        tracing::debug!(error = %e, "freed in place");
    }
}

/// The frames of one connection, each tagged with the connection's number, then one `None` when
/// it ends: how the ChatLink and the HaCoordinator read a connection (a frame of an older
/// connection is told apart by its number).
pub(crate) fn frames_of<T: 'static>(
    conn: u64,
    mut inbound: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = (u64, Option<T>)> + 'static {
    use futures_util::StreamExt;
    futures_util::stream::poll_fn(move |cx| inbound.poll_recv(cx))
        .map(Some)
        .chain(futures_util::stream::once(async { None }))
        .map(move |frame| (conn, frame))
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A 64-bit fingerprint of an id, for tables of a million entries that need not keep a copy of
/// it: each entry still holds the id it stands for (a spec), so a lookup checks it. std's SipHash
/// with fixed keys (it stays in this process's memory).
pub(crate) fn fingerprint(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::{BTreeMap, BTreeSet};

    /// The modules of this crate import each other without a circle: cross-actor messages live
    /// in the leaf `messages`, and actors hold Recipients (docs/ARCHITECTURE.md, invariants).
    #[test]
    fn the_modules_import_each_other_without_a_circle() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut files = vec![];
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                for sub in std::fs::read_dir(&path).unwrap() {
                    let sub = sub.unwrap().path();
                    files.push((path.file_name().unwrap().to_string_lossy().to_string(), sub));
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = path.file_stem().unwrap().to_string_lossy().to_string();
                files.push((module, path));
            }
        }
        for (module, path) in files {
            if module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let uses = imports.entry(module.clone()).or_default();
            for part in text.split("crate::").skip(1) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                // Functions of this root, not modules.
                if !name.is_empty()
                    && name != module
                    && !["now_ms", "drop_later", "frames_of"].contains(&name.as_str())
                {
                    uses.insert(name);
                }
            }
        }
        // Depth-first search for a back edge.
        fn visit(
            m: &str,
            imports: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if done.contains(m) {
                return;
            }
            if let Some(i) = path.iter().position(|p| p == m) {
                panic!("import circle: {} -> {m}", path[i..].join(" -> "));
            }
            path.push(m.to_string());
            for next in imports.get(m).into_iter().flatten() {
                visit(next, imports, path, done);
            }
            path.pop();
            done.insert(m.to_string());
        }
        let mut done = BTreeSet::new();
        for m in imports.keys() {
            visit(m, &imports, &mut Vec::new(), &mut done);
        }
        // The HaCoordinator knows no actor: only the leaves (`store` is the durable store's seam).
        let leaves = ["messages", "metrics", "role", "store"];
        assert!(
            imports["ha"].iter().all(|m| leaves.contains(&m.as_str())),
            "{:?}",
            imports["ha"]
        );
    }
}
