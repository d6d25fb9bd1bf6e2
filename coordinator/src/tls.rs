//! The coordinator's TLS identity (`--tls-cert FILE --tls-key FILE`): PEM files read and checked
//! at start, so that a missing, unreadable or wrong file stops the coordinator with its name
//! rather than failing the first handshake. Served with rustls (tonic's `tls-ring`).

use std::path::{Path, PathBuf};
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// The certificate chain and private key files of the server.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS {what} file {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("TLS {what} file {path} holds no PEM `{block}` block")]
    NotPem { what: &'static str, path: PathBuf, block: &'static str },
    #[error("TLS certificate {cert} and key {key} are not a usable pair: {detail}")]
    Invalid { cert: PathBuf, key: PathBuf, detail: String },
    #[error("--tls-cert and --tls-key go together; only the {given} was given")]
    Half { given: &'static str },
}

impl TlsFiles {
    /// Both files, neither, or an error naming the one that is missing.
    pub fn from_flags(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<TlsFiles>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Half { given: "certificate (--tls-cert)" }),
            (None, Some(_)) => Err(TlsError::Half { given: "key (--tls-key)" }),
        }
    }

    /// Reads both files and checks that rustls accepts them as a server identity.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read_pem(&self.cert, "certificate", "CERTIFICATE")?;
        let key = read_pem(&self.key, "private key", "PRIVATE KEY")?;
        let config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        // The acceptor is built (and the pair parsed) here, at start.
        Server::builder().tls_config(config.clone()).map_err(|e| TlsError::Invalid {
            cert: self.cert.clone(),
            key: self.key.clone(),
            detail: with_causes(&e),
        })?;
        Ok(config)
    }
}

/// An error and its sources, joined ("transport error: ..."): tonic's own text says little.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Reads a PEM file that must hold a `block` ("CERTIFICATE", or "PRIVATE KEY" which also
/// matches "RSA PRIVATE KEY" and "EC PRIVATE KEY").
fn read_pem(path: &Path, what: &'static str, block: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })?;
    if !String::from_utf8_lossy(&bytes).contains(&format!("{block}-----")) {
        return Err(TlsError::NotPem { what, path: path.to_path_buf(), block });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_half_or_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsFiles { cert: dir.path().join("nope.pem"), key: dir.path().join("key.pem") };
        let err = missing.load().unwrap_err().to_string();
        assert!(err.contains("certificate file") && err.contains("nope.pem"), "{err}");

        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "hello").unwrap();
        let err = TlsFiles { cert: cert.clone(), key: cert.clone() }.load().unwrap_err().to_string();
        assert!(err.contains("cert.pem") && err.contains("CERTIFICATE"), "{err}");

        let err = TlsFiles::from_flags(Some(cert), None).unwrap_err().to_string();
        assert!(err.contains("--tls-key"), "{err}");
        assert_eq!(TlsFiles::from_flags(None, None).unwrap(), None);
    }
}
