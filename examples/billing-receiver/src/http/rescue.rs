//! Every failure of a webhook request, and the one mapping from failure to HTTP status.
//! 4xx means "this batch will never be accepted" (the sender parks it); 5xx means "retry".

use http::StatusCode;

use crate::db::DbError;
use crate::event::BatchError;
use crate::signature::SignatureError;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("only POST is accepted")]
    Method,
    #[error("X-Openfaas-Event {0:?} is not handled; expected \"function_usage\"")]
    EventType(String),
    #[error("body exceeds the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("timed out reading the body")]
    BodyTimeout,
    #[error("reading the body failed: {0}")]
    Body(String),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Method => StatusCode::METHOD_NOT_ALLOWED,
            Self::EventType(_) | Self::Batch(_) | Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::Db(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message sent to the client. Database details stay in the log.
    pub fn public_message(&self) -> String {
        match self {
            Self::Db(e) if e.is_unavailable() => {
                "database unavailable, retry later; nothing was stored".into()
            }
            Self::Db(_) => "database error; nothing was stored".into(),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(
            RequestError::Method.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            RequestError::TooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            RequestError::from(SignatureError::Missing).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            RequestError::from(BatchError::NotArray).status(),
            StatusCode::BAD_REQUEST
        );
        let timeout = DbError::Timeout(std::time::Duration::from_secs(1));
        assert_eq!(
            RequestError::from(timeout).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
