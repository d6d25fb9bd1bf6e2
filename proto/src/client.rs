//! The typed client every MedTVT process uses to reach the coordinator: a channel with connect
//! retries (exponential backoff), the bearer token attached to every call, and the message size
//! limits the server uses. An `https://` address is dialled over TLS (rustls), trusting the CA
//! in [`ConnectOptions::ca_cert`] (callers read it from `MEDTVT_TLS_CA`, see
//! [`ConnectOptions::with_ca_from_env`]) or else the system's roots.
//!
//! After a coordinator restart (it resumes from its run directory), calls fail with UNAVAILABLE
//! until it is back, and a process's worker id is unknown to it: calls carrying it answer
//! NOT_FOUND with the reason `UNKNOWN_WORKER` in the status details ([`is_unknown_worker`],
//! [`crate::errors`]); the process registers again and carries on with its job.
//!
//! ```no_run
//! # async fn demo() -> Result<(), medtvt_proto::client::ClientError> {
//! use medtvt_proto::client;
//! let token = client::read_token_file(std::path::Path::new("/run/secrets/medtvt-token"))?;
//! let mut coordinator = client::connect("http://127.0.0.1:50051", Some(&token)).await?;
//! let status = coordinator.get_status(medtvt_proto::v1::StatusRequest::default()).await;
//! # let _ = status; Ok(()) }
//! ```

use crate::errors::{reason_of, ErrorReason};
use crate::CoordinatorClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The environment variable naming the CA certificate (PEM) that signed the coordinator's.
pub const TLS_CA_ENV: &str = "MEDTVT_TLS_CA";

/// The client type workers and learners hold.
pub type Client = CoordinatorClient<InterceptedService<Channel, RequestDecorator>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid coordinator address `{url}`: {source}")]
    BadUrl { url: String, source: tonic::transport::Error },
    #[error("cannot connect to the coordinator at {url} after {attempts} attempts: {source}")]
    Connect { url: String, attempts: u32, source: tonic::transport::Error },
    #[error("cannot read auth token file {path}: {source}")]
    TokenFile { path: PathBuf, source: std::io::Error },
    #[error("auth token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("the auth token contains characters not allowed in gRPC metadata")]
    BadToken,
    #[error("cannot read the TLS CA certificate {path}: {source}")]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("TLS CA certificate {path} holds no PEM `CERTIFICATE` block")]
    CaNotPem { path: PathBuf },
    #[error("a TLS CA certificate ({path}) was given but `{url}` is not an https:// address")]
    CaWithoutTls { url: String, path: PathBuf },
    #[error("cannot set up TLS for {url}: {source}")]
    Tls { url: String, source: tonic::transport::Error },
}

/// Whether `status` is the coordinator saying it does not know the caller's worker id (it
/// restarted, or declared the process gone): register again. Decided by the reason code alone.
pub fn is_unknown_worker(status: &tonic::Status) -> bool {
    reason_of(status) == Some(ErrorReason::UnknownWorker)
}

/// Whether `status` says the caller's learner group was replaced by a new one (a rank was lost
/// or a replacement joined): the learner asks for a seat in the new group.
pub fn is_stale_group(status: &tonic::Status) -> bool {
    reason_of(status) == Some(ErrorReason::StaleGroup)
}

/// Whether `status` is the coordinator refusing a PublishWeights because it already holds that
/// policy version (or a newer one) of the job: a learner that resumed from a checkpoint
/// publishes versions again that it had published before it died.
pub fn is_already_published(status: &tonic::Status) -> bool {
    reason_of(status) == Some(ErrorReason::AlreadyPublished)
}

/// How [`connect_with`] dials.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Total connection attempts before giving up (at least 1).
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Largest message accepted or sent; match the server's limit.
    pub max_message_bytes: usize,
    /// For `https://` addresses: the CA certificate (PEM) to trust; `None` trusts the system's
    /// roots.
    pub ca_cert: Option<PathBuf>,
}

impl ConnectOptions {
    /// These options with `ca_cert` from `MEDTVT_TLS_CA` when it is set and not empty.
    pub fn with_ca_from_env(mut self) -> Self {
        if let Some(path) = std::env::var_os(TLS_CA_ENV).filter(|v| !v.is_empty()) {
            self.ca_cert = Some(PathBuf::from(path));
        }
        self
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            attempts: 20,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: crate::DEFAULT_MAX_MESSAGE_BYTES,
            ca_cert: None,
        }
    }
}

/// Adds the bearer token to every outgoing call. This is also the one place where outgoing
/// trace context (W3C `traceparent`) will be injected.
#[derive(Clone)]
pub struct RequestDecorator {
    authorization: Option<MetadataValue<Ascii>>,
}

impl RequestDecorator {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let authorization = token
            .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>().map_err(|_| ClientError::BadToken))
            .transpose()?;
        Ok(RequestDecorator { authorization })
    }
}

impl std::fmt::Debug for RequestDecorator {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestDecorator")
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Interceptor for RequestDecorator {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        // The caller's span becomes the parent of the coordinator's span for this call.
        medtvt_telemetry::propagation::inject_current_context(request.metadata_mut());
        Ok(request)
    }
}

/// Reads a shared-secret token file (surrounding whitespace trimmed).
pub fn read_token_file(path: &Path) -> Result<String, ClientError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ClientError::TokenFile { path: path.to_path_buf(), source })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ClientError::EmptyToken { path: path.to_path_buf() });
    }
    Ok(token.to_string())
}

/// Connects with the default [`ConnectOptions`].
pub async fn connect(url: &str, token: Option<&str>) -> Result<Client, ClientError> {
    connect_with(url, token, &ConnectOptions::default()).await
}

/// The TLS settings for `url`: none for `http://`, rustls with the given CA (else the system's
/// roots) for `https://`.
fn tls_for(url: &str, ca_cert: Option<&Path>) -> Result<Option<ClientTlsConfig>, ClientError> {
    if !url.starts_with("https://") {
        return match ca_cert {
            Some(path) => Err(ClientError::CaWithoutTls { url: url.to_string(), path: path.to_path_buf() }),
            None => Ok(None),
        };
    }
    let Some(path) = ca_cert else { return Ok(Some(ClientTlsConfig::new().with_native_roots())) };
    let pem = std::fs::read(path).map_err(|source| ClientError::CaFile { path: path.to_path_buf(), source })?;
    if !String::from_utf8_lossy(&pem).contains("BEGIN CERTIFICATE") {
        return Err(ClientError::CaNotPem { path: path.to_path_buf() });
    }
    Ok(Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))))
}

/// Connects to `url` (e.g. `http://coordinator:50051`, or `https://...` for TLS), retrying
/// with exponential backoff while the coordinator is not up yet.
pub async fn connect_with(url: &str, token: Option<&str>, options: &ConnectOptions) -> Result<Client, ClientError> {
    let decorator = RequestDecorator::new(token)?;
    let tls = tls_for(url, options.ca_cert.as_deref())?;
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| ClientError::BadUrl { url: url.to_string(), source })?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        // Weight streams are large: let HTTP/2 flow-control windows grow with the link.
        .http2_adaptive_window(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|source| ClientError::Tls { url: url.to_string(), source })?;
    }
    let attempts = options.attempts.max(1);
    let mut backoff = options.initial_backoff;
    let mut attempt = 1;
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(source) if attempt >= attempts => {
                return Err(ClientError::Connect { url: url.to_string(), attempts, source });
            }
            Err(err) => {
                tracing::debug!(%url, attempt, error = %err, "coordinator not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(options.max_backoff);
                attempt += 1;
            }
        }
    };
    Ok(CoordinatorClient::with_interceptor(channel, decorator)
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(options.max_message_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::reject;

    #[test]
    fn token_file_is_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("medtvt-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "  abc\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "abc");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read_token_file(&path), Err(ClientError::EmptyToken { .. })));
        let missing = read_token_file(&dir.join("nope")).unwrap_err().to_string();
        assert!(missing.contains("nope"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn decorator_adds_the_bearer_header_and_never_prints_it() {
        let mut decorator = RequestDecorator::new(Some("s3cret")).unwrap();
        let request = decorator.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer s3cret");
        assert!(!format!("{decorator:?}").contains("s3cret"));
        assert!(matches!(RequestDecorator::new(Some("bad\ntoken")), Err(ClientError::BadToken)));
    }

    #[tokio::test]
    async fn connect_gives_up_after_the_configured_attempts() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options =
            ConnectOptions { attempts: 2, initial_backoff: Duration::from_millis(1), ..ConnectOptions::default() };
        let err = connect_with(&format!("http://127.0.0.1:{port}"), None, &options).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { attempts: 2, .. }), "{err}");
        assert!(matches!(connect("not a url", None).await, Err(ClientError::BadUrl { .. })));
    }

    #[test]
    fn tls_settings_follow_the_scheme_and_name_the_ca_file() {
        assert!(tls_for("http://h:1", None).unwrap().is_none());
        assert!(tls_for("https://h:1", None).unwrap().is_some());
        let ca = Path::new("/nonexistent/ca.pem");
        assert!(matches!(tls_for("http://h:1", Some(ca)), Err(ClientError::CaWithoutTls { .. })));
        let err = tls_for("https://h:1", Some(ca)).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn clients_branch_on_the_reason_code_not_on_the_message() {
        assert!(is_unknown_worker(&reject(ErrorReason::UnknownWorker, "reworded at will")));
        assert!(!is_unknown_worker(&reject(ErrorReason::UnknownJob, "unknown worker id 7: register again")));
        // The old message text without a reason no longer counts.
        assert!(!is_unknown_worker(&tonic::Status::not_found("unknown worker id 7: register again")));
        assert!(is_already_published(&reject(ErrorReason::AlreadyPublished, "anything")));
        assert!(!is_already_published(&reject(
            ErrorReason::JobNotRunning,
            "job 2 already has weights of version 3 or newer"
        )));
    }
}
