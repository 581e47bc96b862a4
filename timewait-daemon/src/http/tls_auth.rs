//! `--web.config.file`: TLS and basic auth, in the Prometheus exporter-toolkit's web config format.
//!
//! The format (https://github.com/prometheus/exporter-toolkit):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/timewait/tls.crt
//!   key_file: /etc/timewait/tls.key
//! basic_auth_users:
//!   prometheus: $2y$10$...   # bcrypt hash
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Error)]
pub enum WebConfigError {
    #[error("cannot read web config {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("web config {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("web config {path}: {what}")]
    Invalid { path: String, what: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// What the web config asks for, validated and loaded.
pub struct WebConfig {
    pub tls: Option<TlsAcceptor>,
    pub auth: Option<Arc<BasicAuth>>,
}

/// Checks `Authorization: Basic` against bcrypt hashes. bcrypt is slow by
/// design (tens of ms), so credentials that verified once are remembered
/// (a bounded set of header values), and, as the exporter-toolkit does,
/// one bcrypt runs at a time (wrong passwords cannot take every core) and
/// an unknown user is checked against a decoy hash of the same cost (its
/// answer takes as long as a wrong password's: user names cannot be probed).
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<String>>,
    /// A hash of no password anyone sends, at the users' cost (the highest
    /// when they differ).
    decoy: String,
    /// One bcrypt at a time.
    serial: tokio::sync::Mutex<()>,
}

const VERIFIED_CACHE: usize = 64;

/// The cost of a bcrypt hash (`$2y$10$...`: 10).
fn bcrypt_cost(hash: &str) -> Option<u32> {
    hash.split('$').nth(2)?.parse().ok()
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Result<Self, bcrypt::BcryptError> {
        let cost = users.values().filter_map(|h| bcrypt_cost(h)).max().unwrap_or(bcrypt::DEFAULT_COST);
        let decoy = bcrypt::hash("timewaitd: no such user", cost.clamp(4, 31))?;
        Ok(Self { users, verified: Mutex::new(HashSet::new()), decoy, serial: tokio::sync::Mutex::new(()) })
    }

    /// Credentials that verified before (no bcrypt).
    fn known_good(&self, header_value: &str) -> bool {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(header_value)
    }

    /// The full check: one bcrypt, known user or not.
    fn check(&self, header_value: &str) -> bool {
        if self.known_good(header_value) {
            return true;
        }
        let Some(b64) = header_value.strip_prefix("Basic ") else { return false };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else { return false };
        let Ok(raw) = String::from_utf8(raw) else { return false };
        let Some((user, pass)) = raw.split_once(':') else { return false };
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (self.decoy.as_str(), false),
        };
        if !(bcrypt::verify(pass, hash).unwrap_or(false) && known) {
            return false;
        }
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(header_value.to_string());
        true
    }
}

/// axum middleware: 401 with a Basic challenge unless the credentials check.
pub async fn require_auth(State(auth): State<Arc<BasicAuth>>, req: Request, next: Next) -> Response {
    let header_value = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let ok = match header_value {
        Some(v) if auth.known_good(&v) => true,
        Some(v) => {
            // Waiting here holds no thread; the request timeout bounds it.
            let _one_at_a_time = auth.serial.lock().await;
            let auth = auth.clone();
            tokio::task::spawn_blocking(move || auth.check(&v)).await.unwrap_or(false)
        }
        None => false,
    };
    if ok {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"timewaitd\"")], "unauthorized\n")
            .into_response()
    }
}

pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| WebConfigError::Read { path: p.clone(), err })?;
    let file: File = serde_yaml_ng::from_str(&text).map_err(|e| WebConfigError::Parse {
        path: p.clone(),
        msg: e.to_string().lines().next().unwrap_or_default().to_string(),
    })?;
    let invalid = |what: String| WebConfigError::Invalid { path: p.clone(), what };
    let auth = match file.basic_auth_users {
        Some(users) if !users.is_empty() => {
            for (user, hash) in &users {
                // A plain-text password here would silently never match.
                if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$")) {
                    return Err(invalid(format!("basic_auth_users.{user} is not a bcrypt hash (htpasswd -nBC 10 \"\" | tr -d ':\\n')")));
                }
            }
            let auth = BasicAuth::new(users).map_err(|e| invalid(format!("basic_auth_users: {e}")))?;
            Some(Arc::new(auth))
        }
        _ => None,
    };
    let tls = match file.tls_server_config {
        None => None,
        Some(t) => {
            let base = path.parent().unwrap_or(Path::new("."));
            let cert_path = base.join(&t.cert_file);
            let key_path = base.join(&t.key_file);
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| invalid(format!("cert_file {}: {e}", cert_path.display())))?;
            if certs.is_empty() {
                return Err(invalid(format!("cert_file {}: no certificate in it", cert_path.display())));
            }
            let key = PrivateKeyDer::from_pem_file(&key_path)
                .map_err(|e| invalid(format!("key_file {}: {e}", key_path.display())))?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| invalid(format!("TLS: {e}")))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| invalid(format!("cert_file/key_file do not make a usable pair: {e}")))?;
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(TlsAcceptor::from(Arc::new(cfg)))
        }
    };
    Ok(WebConfig { tls, auth })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let dir = std::env::temp_dir().join(format!("tw-web-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = load(&write(&dir, "a.yml", "basic_auth_users:\n  u: plain\n")).err().unwrap().to_string();
        assert!(e.contains("not a bcrypt hash"), "{e}");
        let e = load(&write(&dir, "b.yml", "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n")).err().unwrap().to_string();
        assert!(e.contains("nope.crt"), "{e}");
        let e = load(&write(&dir, "c.yml", "tls_server_cfg: {}\n")).err().unwrap().to_string();
        assert!(e.contains("unknown field") && !e.contains('\n'), "{e}");
        assert!(load(&dir.join("missing.yml")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn basic_auth_checks_bcrypt_and_caches() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new([("alice".to_string(), hash)].into()).unwrap();
        assert_eq!(bcrypt_cost(&auth.decoy), Some(4), "the decoy costs what the users' hashes cost");
        let enc = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert!(auth.check(&enc("alice:s3cret")));
        assert!(auth.verified.lock().unwrap().contains(&enc("alice:s3cret")));
        assert!(!auth.check(&enc("alice:wrong")));
        assert!(!auth.check(&enc("bob:s3cret")));
        assert!(!auth.check("Bearer x"));
        assert!(!auth.check("Basic !!!"));
    }
}
