//! Checks of the ids and lengths clients send: a leaf every part of the Chat Server may use.

use bgs_proto::chat::ChatErrorCode;

use crate::error::{refuse, Result};

/// The longest id (session, participant, cluster, key) a client may send.
pub const MAX_ID: usize = 128;

/// An id: 1 to [`MAX_ID`] characters of `A-Z a-z 0-9 - _ . : @`.
pub fn check_id(what: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b));
    if !ok {
        return refuse(
            ChatErrorCode::BadRequest,
            format!(
                "{what} must be 1 to {MAX_ID} characters of A-Z a-z 0-9 - _ . : @, not {value:?}"
            ),
        );
    }
    Ok(())
}

pub fn check_len(what: &str, value: &str, min: usize, max: usize) -> Result<()> {
    if value.len() < min || value.len() > max {
        return refuse(
            ChatErrorCode::BadRequest,
            format!(
                "{what} must be {min} to {max} bytes long, not {}",
                value.len()
            ),
        );
    }
    Ok(())
}
