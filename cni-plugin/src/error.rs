//! The plugin's errors and their CNI spec error codes.
//!
//! Contract: every failure of a command is one [`CniError`]; [`CniError::code`] is the code the
//! spec assigns to that kind of failure, and [`CniError::to_json`] is the error object printed
//! on stdout (the process then exits non-zero). Messages say what was wrong and what to do.
use serde_json::json;

/// Error codes. 1-7 and 11 are the spec's well-known codes, 50/51 its STATUS codes; 100+ are
/// this plugin's own (documented in docs/cni.md).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// CHECK found the attachment different from what ADD made (or missing).
    pub const CHECK_FAILED: u32 = 100;
    /// The attachment (container ID + ifname) already exists: ADD refuses to make it twice.
    pub const ALREADY_EXISTS: u32 = 101;
    /// A bug: the plugin panicked. Never expected; reported instead of a backtrace.
    pub const INTERNAL: u32 = 999;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{msg}")]
    IncompatibleVersion { msg: String },
    #[error("{msg}")]
    UnsupportedField { msg: String },
    #[error("{msg}")]
    UnknownContainer { msg: String },
    #[error("{msg}")]
    InvalidEnv { msg: String },
    #[error("{msg}: {source}")]
    Io {
        msg: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{msg}")]
    Decode { msg: String },
    #[error("{msg}")]
    InvalidConfig { msg: String },
    #[error("{msg}")]
    TryAgain { msg: String },
    #[error("{msg}")]
    NotAvailable { msg: String },
    #[error("{msg}")]
    Exhausted { msg: String },
    #[error("{msg}")]
    CheckFailed { msg: String },
    #[error("{msg}")]
    AlreadyExists { msg: String },
    /// An error reported by a delegated plugin (e.g. an IPAM plugin), passed through as is.
    #[error("{plugin}: {msg}")]
    Delegate { plugin: String, code: u32, msg: String, details: String },
}

impl CniError {
    pub fn io(msg: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { msg: msg.into(), source }
    }

    pub fn code(&self) -> u32 {
        use code::*;
        match self {
            Self::IncompatibleVersion { .. } => INCOMPATIBLE_VERSION,
            Self::UnsupportedField { .. } => UNSUPPORTED_FIELD,
            Self::UnknownContainer { .. } => UNKNOWN_CONTAINER,
            Self::InvalidEnv { .. } => INVALID_ENV,
            Self::Io { .. } => IO,
            Self::Decode { .. } => DECODE,
            Self::InvalidConfig { .. } => INVALID_CONFIG,
            Self::TryAgain { .. } => TRY_AGAIN,
            Self::NotAvailable { .. } => NOT_AVAILABLE,
            Self::Exhausted { .. } => LIMITED_CONNECTIVITY,
            Self::CheckFailed { .. } => CHECK_FAILED,
            Self::AlreadyExists { .. } => ALREADY_EXISTS,
            Self::Delegate { code, .. } => *code,
        }
    }

    /// The spec's error object; `version` is the config's cniVersion (or the newest one).
    pub fn to_json(&self, version: &str) -> serde_json::Value {
        let details = match self {
            Self::Io { source, .. } => source.to_string(),
            Self::Delegate { details, .. } => details.clone(),
            _ => String::new(),
        };
        let msg = match self {
            Self::Io { msg, .. } => msg.clone(),
            other => other.to_string(),
        };
        let mut obj = json!({ "cniVersion": version, "code": self.code(), "msg": msg });
        if !details.is_empty() {
            obj["details"] = details.into();
        }
        obj
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_objects_carry_code_msg_and_details() {
        let err = CniError::io("writing the IPAM store", std::io::Error::from_raw_os_error(28));
        let obj = err.to_json("1.0.0");
        assert_eq!(obj["code"], 5);
        assert_eq!(obj["cniVersion"], "1.0.0");
        assert_eq!(obj["msg"], "writing the IPAM store");
        assert!(obj["details"].as_str().unwrap().contains("No space left"));
        let obj = CniError::Exhausted { msg: "full".into() }.to_json("1.1.0");
        assert_eq!(obj["code"], 51);
        assert!(obj.get("details").is_none());
    }
}
