//! What happens to every incoming Coordinator call before its handler: the shared-secret check
//! (`authorization: Bearer <token>`, compared in constant time, never logged) and, in this one
//! place, the hook that will extract W3C trace context (`traceparent`) from the metadata.

use std::sync::Arc;
use tonic::{Request, Status};

#[derive(Clone)]
pub struct IncomingCall {
    expected: Option<Arc<[u8]>>,
}

impl IncomingCall {
    pub fn new(token: Option<&str>) -> Self {
        IncomingCall { expected: token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())) }
    }
}

impl tonic::service::Interceptor for IncomingCall {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(expected) = &self.expected {
            let given = request.metadata().get("authorization").map(|v| v.as_bytes()).unwrap_or_default();
            if !constant_time_eq(given, expected) {
                return Err(medtvt_proto::errors::reject(
                    medtvt_proto::errors::ErrorReason::Unauthenticated,
                    "missing or wrong `authorization: Bearer <token>` metadata",
                ));
            }
        }
        Ok(extract_trace_context(request))
    }
}

/// The hook for cross-process tracing: the parent span context will be read from the
/// `traceparent` metadata here and stored in the request's extensions.
fn extract_trace_context(request: Request<()>) -> Request<()> {
    request
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn call(check: &mut IncomingCall, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        check.call(req).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn token_is_required_only_when_configured() {
        let mut open = IncomingCall::new(None);
        assert_eq!(call(&mut open, None), Ok(()));
        let mut locked = IncomingCall::new(Some("s3cret"));
        assert_eq!(call(&mut locked, Some("Bearer s3cret")), Ok(()));
        assert_eq!(call(&mut locked, Some("Bearer s3cre")), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut locked, None), Err(tonic::Code::Unauthenticated));
    }
}
