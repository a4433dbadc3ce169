//! The Chat Server's error type. Every refusal carries a stable code from the chat protocol.

use bgs_proto::chat::{ChatError, ChatErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ChatServerError {
    /// A request was refused; the code and message go back to the client as they are.
    #[error("{0}")]
    Refused(ChatError),
    #[error("journal: {0}")]
    Journal(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
}

impl ChatServerError {
    pub fn refused(code: ChatErrorCode, message: impl Into<String>) -> Self {
        ChatServerError::Refused(ChatError::new(code, message))
    }

    /// The protocol form of this error (internal failures keep their message, lose detail).
    pub fn to_chat_error(&self) -> ChatError {
        match self {
            ChatServerError::Refused(e) => e.clone(),
            other => ChatError::new(ChatErrorCode::Internal, other.to_string()),
        }
    }
}

impl From<ChatError> for ChatServerError {
    fn from(e: ChatError) -> Self {
        ChatServerError::Refused(e)
    }
}

pub type Result<T, E = ChatServerError> = std::result::Result<T, E>;

/// Shorthand for a refusal.
pub fn refuse<T>(code: ChatErrorCode, message: impl Into<String>) -> Result<T> {
    Err(ChatServerError::refused(code, message))
}
