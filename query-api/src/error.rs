//! The one API error type: every failure maps to a status and `{"error":{"code","message"}}` here.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tollgate_store::StoreError;

/// What went wrong with an API request. Closed set.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("parameter `{param}`: {message}")]
    BadParam {
        param: &'static str,
        message: String,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// A billing period asked for before the store holds all of its events.
    #[error("{message}")]
    Incomplete {
        message: String,
        /// How far the events are complete (RFC 3339), when known.
        complete_through: Option<String>,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadParam {
            param,
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadParam { .. } => (StatusCode::BAD_REQUEST, "bad_parameter"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Incomplete { .. } => (StatusCode::CONFLICT, "period_incomplete"),
            ApiError::Store(StoreError::BadRequest(_)) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Store(e) if e.retryable() => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            ApiError::Store(_) | ApiError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "query failed");
        }
        let mut body = serde_json::json!({"error": {"code": code, "message": self.to_string()}});
        if let ApiError::BadParam { param, .. } = &self {
            body["error"]["param"] = (*param).into();
        }
        if let ApiError::Incomplete {
            complete_through, ..
        } = &self
        {
            body["error"]["complete_through"] = complete_through.clone().into();
        }
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
