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

/// The body of every error: `{"error":{"code","message"}}`.
#[derive(Debug, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Error))]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct ErrorDetail {
    /// `bad_parameter`, `unauthorized`, `forbidden`, `not_found`, `period_incomplete`,
    /// `bad_request`, `store_unavailable` or `internal`.
    code: &'static str,
    message: String,
    /// With `bad_parameter`: the parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'static str>,
    /// With `period_incomplete`: how far the stored events are complete (RFC 3339), when any
    /// collector has reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    complete_through: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "query failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
                param: match &self {
                    ApiError::BadParam { param, .. } => Some(param),
                    _ => None,
                },
                complete_through: match &self {
                    ApiError::Incomplete {
                        complete_through, ..
                    } => complete_through.clone(),
                    _ => None,
                },
            },
        };
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
