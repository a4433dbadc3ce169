//! The feed loop: what every reader of a session (a TCP feed, a WebSocket, a long-poll) runs;
//! it holds only a cursor into the session.

use super::*;

/// Follows a session for one participant: delivers, in order and without gaps, every event after
/// `since` that it may see, until its own `left` event or the session's `closed` event has been
/// delivered, the feed is cancelled, or `deliver` says the reader is gone. Holds only a cursor.
/// `attached_to`: stop as soon as another connection speaks for the participant.
pub async fn follow<F, Fut>(
    session: Arc<Session>,
    participant_id: String,
    mut since: u64,
    attached_to: Option<u64>,
    cancel: CancellationToken,
    mut deliver: F,
) where
    F: FnMut(Vec<ChatEvent>) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut rx = session.subscribe();
    loop {
        rx.borrow_and_update();
        let (mut events, scanned, more) = {
            let st = session.lock();
            let Some(p) = st.participant(&participant_id) else {
                return;
            };
            if let (Some(me), Some(now)) = (attached_to, p.attached) {
                if me != now {
                    return;
                }
            }
            let (events, scanned) = st.read_for(p, since, FEED_BATCH_EVENTS, FEED_BATCH_BYTES);
            // Past the event that removed the participant there is nothing more for it.
            if events.is_empty() && p.ended_at.is_some_and(|end| scanned >= end) {
                return;
            }
            (events, scanned, scanned < st.visible_seq)
        };
        since = scanned;
        let end = events.iter().position(|e| {
            e.kind == EventKind::Closed
                || (e.kind == EventKind::Left && e.participant_id == participant_id)
        });
        if let Some(end) = end {
            events.truncate(end + 1);
        }
        if !events.is_empty() && !deliver(events).await {
            return;
        }
        if end.is_some() {
            return;
        }
        if more {
            continue;
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}
