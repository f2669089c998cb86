//! Who may call the API: the TLS material (a CA and a serving certificate generated on first
//! start into `<data-dir>/pki`) and bearer tokens (`<data-dir>/tokens.json`, created on first
//! start with an admin token), and the kubeconfig that carries both to clients.
//!
//! Authorization is by role: `admin` may do everything; `reader` may only get, list and watch
//! (anything else is 403). Requests without a valid token are 401, except the public health and
//! version endpoints (as Kubernetes' system:public-info-viewer allows).
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};

use crate::resources::meta::new_token;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading or writing {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {detail}; remove it to have it generated again")]
    Invalid { path: PathBuf, detail: String },
    #[error("generating certificates failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io { path: path.to_path_buf(), source }
}

/// Writes a file readable only by its owner, atomically.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), AuthError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        file.write_all(contents).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))
}

/// The CA certificate (PEM) and the serving certificate chain and key.
pub struct Pki {
    pub ca_pem: String,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

fn ca_params() -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "weir-ca");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(ca_params)
}

/// Loads the PKI from `dir`, generating it on first start. The serving certificate names
/// localhost, the `kubernetes` Service names, 127.0.0.1, ::1 and every IP of `extra_ips`;
/// when an IP is missing (a new `--netns-listen` address) it is issued again by the same CA
/// (the IPs it holds are kept in `apiserver.ips`), so kubeconfigs stay valid.
pub fn ensure_pki(dir: &Path, extra_ips: &[std::net::IpAddr]) -> Result<Pki, AuthError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let (ca_path, cert_path, key_path) =
        (dir.join("ca.crt"), dir.join("apiserver.crt"), dir.join("apiserver.key"));
    let (ips_path, ca_key_path) = (dir.join("apiserver.ips"), dir.join("ca.key"));
    let loopback: Vec<std::net::IpAddr> =
        ["127.0.0.1", "::1"].iter().map(|ip| ip.parse().expect("literal IP")).collect();
    let complete = ca_path.exists() && cert_path.exists() && key_path.exists();
    let mut ips: Vec<std::net::IpAddr> = match fs::read_to_string(&ips_path) {
        Ok(text) => text.lines().filter_map(|l| l.trim().parse().ok()).collect(),
        Err(_) => loopback.clone(),
    };
    let missing: Vec<_> = extra_ips.iter().filter(|ip| !ips.contains(ip)).copied().collect();
    if complete && missing.is_empty() {
        return load_pki(&ca_path, &cert_path, &key_path);
    }
    ips.extend(missing);
    let (ca, ca_key) = if complete && ca_key_path.exists() {
        let pem = fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
        let ca_key = rcgen::KeyPair::from_pem(&pem)?;
        // Same name and key as the stored CA certificate: what it signs verifies against it.
        (ca_params()?.self_signed(&ca_key)?, ca_key)
    } else {
        let ca_key = rcgen::KeyPair::generate()?;
        let ca = ca_params()?.self_signed(&ca_key)?;
        write_private(&ca_key_path, ca_key.serialize_pem().as_bytes())?;
        write_private(&ca_path, ca.pem().as_bytes())?;
        (ca, ca_key)
    };
    {
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "weir-apiserver");
        for ip in &ips {
            params.subject_alt_names.push(rcgen::SanType::IpAddress(*ip));
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        // The key first: a crash in between leaves the set incomplete, so it is made again.
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_private(&cert_path, cert.pem().as_bytes())?;
        let listed: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
        write_private(&ips_path, format!("{}\n", listed.join("\n")).as_bytes())?;
    }
    load_pki(&ca_path, &cert_path, &key_path)
}

fn load_pki(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Pki, AuthError> {
    let (ca_path, cert_path, key_path) =
        (ca_path.to_path_buf(), cert_path.to_path_buf(), key_path.to_path_buf());
    let ca_pem = fs::read_to_string(&ca_path).map_err(io(&ca_path))?;
    let invalid =
        |path: &Path, detail: String| AuthError::Invalid { path: path.to_path_buf(), detail };
    let cert_chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| invalid(&cert_path, err.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|err| invalid(&key_path, err.to_string()))?;
    Ok(Pki { ca_pem, cert_chain, key })
}

/// The rustls server configuration for the PKI (HTTP/1.1 only).
pub fn tls_config(pki: &Pki) -> Result<Arc<ServerConfig>, AuthError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(pki.cert_chain.clone(), pki.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Reader,
    /// A node agent (`system:node:NAME`): reads everything, writes only its own Node (and its
    /// status), Pod status, Events, and may register Nodes.
    Node,
}

/// Whether a `Node`-role token of node `node` may make a write (non-GET) request on `path`
/// segments. Pure, so the rule is tested without a server.
pub fn node_may_write(node: &str, method: &str, segments: &[&str]) -> bool {
    match (method, segments) {
        ("POST", ["api", "v1", "nodes"]) => true,
        (
            "PUT" | "PATCH",
            ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"],
        ) => *name == node,
        ("PUT" | "PATCH", ["api", "v1", "namespaces", _, "pods", _, "status"]) => true,
        // Finishing a graceful deletion once the containers are stopped.
        ("DELETE", ["api", "v1", "namespaces", _, "pods", _]) => true,
        ("POST" | "PATCH", ["api", "v1", "namespaces", _, "events", ..]) => true,
        _ => false,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenEntry {
    pub user: String,
    pub token: String,
    pub role: Role,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

/// The known tokens.
#[derive(Clone, Debug)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

impl Tokens {
    /// Loads `<data-dir>/tokens.json`, creating it with an admin and a reader token.
    pub fn ensure(data_dir: &Path) -> Result<Tokens, AuthError> {
        let path = data_dir.join("tokens.json");
        if !path.exists() {
            let file = TokenFile {
                tokens: vec![
                    TokenEntry { user: "admin".into(), token: new_token(), role: Role::Admin },
                    TokenEntry { user: "reader".into(), token: new_token(), role: Role::Reader },
                ],
            };
            let text = serde_json::to_string_pretty(&file).expect("serializable");
            write_private(&path, text.as_bytes())?;
        }
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let file: TokenFile = serde_json::from_str(&text)
            .map_err(|err| AuthError::Invalid { path: path.clone(), detail: err.to_string() })?;
        Ok(Tokens { entries: file.tokens })
    }

    /// Adds a node token for each name in `nodes` that has none, saving the file.
    pub fn ensure_nodes(&mut self, data_dir: &Path, nodes: &[String]) -> Result<(), AuthError> {
        let mut added = false;
        for node in nodes {
            let user = format!("system:node:{node}");
            if self.for_user(&user).is_none() {
                self.entries.push(TokenEntry { user, token: new_token(), role: Role::Node });
                added = true;
            }
        }
        if added {
            let file = TokenFile { tokens: self.entries.clone() };
            let text = serde_json::to_string_pretty(&file).expect("serializable");
            write_private(&data_dir.join("tokens.json"), text.as_bytes())?;
        }
        Ok(())
    }

    /// The entry of the bearer token in an Authorization header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Option<&TokenEntry> {
        let token = authorization?.strip_prefix("Bearer ")?.trim();
        // Compare every entry fully so timing does not tell which prefix matched.
        let mut found = None;
        for entry in &self.entries {
            let a = entry.token.as_bytes();
            let b = token.as_bytes();
            let same =
                a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
            if same {
                found = Some(entry);
            }
        }
        found
    }

    pub fn for_user(&self, user: &str) -> Option<&TokenEntry> {
        self.entries.iter().find(|e| e.user == user)
    }
}

/// A kubeconfig (JSON is valid YAML) for `server` with the CA and `token`.
pub fn kubeconfig(server: &str, ca_pem: Option<&str>, token: &str, user: &str) -> String {
    let mut cluster = serde_json::json!({"server": server});
    if let Some(ca) = ca_pem {
        cluster["certificate-authority-data"] =
            base64::engine::general_purpose::STANDARD.encode(ca).into();
    }
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weir", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "weir", "context": {"cluster": "weir", "user": user, "namespace": "default"}}],
        "current-context": "weir",
        "preferences": {},
    });
    serde_json::to_string_pretty(&config).expect("serializable")
}

/// Writes a kubeconfig file (mode 0600, atomically).
pub fn write_kubeconfig(path: &Path, contents: &str) -> Result<(), AuthError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    write_private(path, contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_tokens_write_only_their_own_node_and_pod_status() {
        let may = |method: &str, path: &str| {
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            node_may_write("a", method, &segments)
        };
        assert!(may("PATCH", "/api/v1/nodes/a/status"));
        assert!(may("PUT", "/api/v1/nodes/a"));
        assert!(!may("PATCH", "/api/v1/nodes/b/status"));
        assert!(may("PATCH", "/api/v1/namespaces/x/pods/p/status"));
        assert!(!may("PATCH", "/api/v1/namespaces/x/pods/p"));
        assert!(may("DELETE", "/api/v1/namespaces/x/pods/p"));
        assert!(!may("DELETE", "/api/v1/namespaces/x/services/s"));
        assert!(may("POST", "/api/v1/namespaces/x/events"));
        assert!(!may("POST", "/api/v1/namespaces/x/configmaps"));
        assert!(may("POST", "/api/v1/nodes"));
    }

    #[test]
    fn tokens_authenticate_only_exact_bearer_values() {
        let tokens = Tokens {
            entries: vec![TokenEntry {
                user: "admin".into(),
                token: "abc".into(),
                role: Role::Admin,
            }],
        };
        assert_eq!(tokens.authenticate(Some("Bearer abc")).map(|e| e.role), Some(Role::Admin));
        assert!(tokens.authenticate(Some("Bearer ab")).is_none());
        assert!(tokens.authenticate(Some("Basic abc")).is_none());
        assert!(tokens.authenticate(None).is_none());
    }
}
