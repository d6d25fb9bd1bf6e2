//! The typed client every MedTVT process uses to reach the coordinator: a channel with connect
//! retries (exponential backoff), the bearer token attached to every call, and the message size
//! limits the server uses.
//!
//! ```no_run
//! # async fn demo() -> Result<(), medtvt_proto::client::ClientError> {
//! use medtvt_proto::client;
//! let token = client::read_token_file(std::path::Path::new("/run/secrets/medtvt-token"))?;
//! let mut coordinator = client::connect("http://127.0.0.1:50051", Some(&token)).await?;
//! let status = coordinator.get_status(medtvt_proto::v1::StatusRequest::default()).await;
//! # let _ = status; Ok(()) }
//! ```

use crate::CoordinatorClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

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
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            attempts: 20,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: crate::DEFAULT_MAX_MESSAGE_BYTES,
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
        f.debug_struct("RequestDecorator").field("authorization", &self.authorization.as_ref().map(|_| "<redacted>")).finish()
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
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::TokenFile { path: path.to_path_buf(), source })?;
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

/// Connects to `url` (e.g. `http://coordinator:50051`), retrying with exponential backoff
/// while the coordinator is not up yet.
pub async fn connect_with(url: &str, token: Option<&str>, options: &ConnectOptions) -> Result<Client, ClientError> {
    let decorator = RequestDecorator::new(token)?;
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| ClientError::BadUrl { url: url.to_string(), source })?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        // Weight streams are large: let HTTP/2 flow-control windows grow with the link.
        .http2_adaptive_window(true);
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
        let options = ConnectOptions { attempts: 2, initial_backoff: Duration::from_millis(1), ..ConnectOptions::default() };
        let err = connect_with(&format!("http://127.0.0.1:{port}"), None, &options).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { attempts: 2, .. }), "{err}");
        assert!(matches!(connect("not a url", None).await, Err(ClientError::BadUrl { .. })));
    }
}
