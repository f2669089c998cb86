//! API errors and the Kubernetes `Status` objects that carry them.
use serde_json::{Value, json};

use crate::resources::{Resource, validate::FieldError};

/// An error answer: HTTP code, Kubernetes reason and message, optional details.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None }
    }

    fn with_details(mut self, resource: &Resource, name: &str) -> ApiError {
        self.details =
            Some(json!({"name": name, "group": resource.group, "kind": resource.plural}));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn forbidden(resource: &Resource, name: &str, why: &str) -> ApiError {
        ApiError::new(
            403,
            "Forbidden",
            format!("{} {name:?} is forbidden: {why}", resource.qualified()),
        )
        .with_details(resource, name)
    }

    pub fn not_found(resource: &Resource, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{} {name:?} not found", resource.qualified()))
            .with_details(resource, name)
    }

    pub fn no_route() -> ApiError {
        ApiError::new(404, "NotFound", "the server could not find the requested resource")
    }

    pub fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method ({method}) on the requested resource"),
        )
    }

    pub fn already_exists(resource: &Resource, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", resource.qualified()),
        )
        .with_details(resource, name)
    }

    pub fn conflict(resource: &Resource, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please \
                 apply your changes to the latest version and try again",
                resource.qualified()
            ),
        )
        .with_details(resource, name)
    }

    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn too_large() -> ApiError {
        ApiError::new(413, "RequestEntityTooLarge", "Request entity too large: limit is 3145728")
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {content_type:?})"
            ),
        )
    }

    pub fn invalid(resource: &Resource, name: &str, errors: &[FieldError]) -> ApiError {
        let summary: Vec<String> =
            errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.reason, "message": e.message, "field": e.field}))
            .collect();
        let mut err = ApiError::new(
            422,
            "Invalid",
            format!("{} {name:?} is invalid: [{}]", resource.kind, summary.join(", ")),
        );
        err.details = Some(
            json!({"name": name, "group": resource.group, "kind": resource.kind, "causes": causes}),
        );
        err
    }

    pub fn too_many_requests() -> ApiError {
        ApiError::new(429, "TooManyRequests", "too many requests in flight, please try again later")
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> ApiError {
        match err {
            crate::store::StoreError::Compacted { .. } => ApiError::gone(err.to_string()),
            other => ApiError::internal(format!("storage error: {other}")),
        }
    }
}

/// The `Status` a successful delete of a collection-less object may return.
pub fn success() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
}
