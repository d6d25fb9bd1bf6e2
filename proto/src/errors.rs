//! Errors on the wire: every error of the Coordinator service carries a machine-readable reason
//! ([`ErrorReason`], documented in `medtvt/v1/coordinator.proto`) as a google.rpc.ErrorInfo in the
//! gRPC status details, besides its code and a message for people. Servers build statuses with
//! [`reject`], which also decides each reason's gRPC code ([`grpc_code`], the one place that
//! mapping lives); clients read the reason with [`reason_of`] and branch on it, never on the text.

use std::collections::HashMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use crate::v1::ErrorReason;

/// The ErrorInfo domain of this API's reasons.
pub const ERROR_DOMAIN: &str = "medtvt.v1";

/// The gRPC code that goes with each reason (as the proto documents it).
pub fn grpc_code(reason: ErrorReason) -> Code {
    use ErrorReason::*;
    match reason {
        UnknownWorker | UnknownJob => Code::NotFound,
        JobNotRunning | NotGrpo | WrongRole | StepNotReady | StepPruned | ForeignCheckpoint | LastStepNotReported
        | AlreadyPublished | StaleGroup => Code::FailedPrecondition,
        InvalidJob | InvalidGroup | BadRank | StepOutOfRange | InvalidWeights | InvalidRequest => Code::InvalidArgument,
        ShuttingDown => Code::Unavailable,
        RendezvousTimeout => Code::DeadlineExceeded,
        Unauthenticated => Code::Unauthenticated,
        PathNotAllowed => Code::PermissionDenied,
        MessageTooLarge => Code::ResourceExhausted,
        Internal | Unspecified => Code::Internal,
    }
}

/// A status for `reason`: its gRPC code, `message` for people, and the ErrorInfo in the details.
pub fn reject(reason: ErrorReason, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(reason.as_str_name(), ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(grpc_code(reason), message, details)
}

/// The reason a status carries (`None`: no ErrorInfo of this API's domain, e.g. a transport error).
pub fn reason_of(status: &Status) -> Option<ErrorReason> {
    let info = status.get_details_error_info()?;
    if info.domain != ERROR_DOMAIN {
        return None;
    }
    ErrorReason::from_str_name(&info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_survives_the_trip_through_the_status_details() {
        for reason in [ErrorReason::UnknownWorker, ErrorReason::AlreadyPublished, ErrorReason::InvalidJob] {
            let status = reject(reason, "anything at all");
            assert_eq!(status.code(), grpc_code(reason));
            assert_eq!(reason_of(&status), Some(reason));
            // The details travel as the grpc-status-details-bin trailer.
            let response = status.clone().into_http::<()>();
            let back = Status::from_header_map(response.headers()).unwrap();
            assert_eq!(reason_of(&back), Some(reason));
        }
    }

    #[test]
    fn the_reason_names_on_the_wire_are_the_proto_names() {
        assert_eq!(ErrorReason::UnknownWorker.as_str_name(), "UNKNOWN_WORKER");
        assert_eq!(ErrorReason::AlreadyPublished.as_str_name(), "ALREADY_PUBLISHED");
    }

    #[test]
    fn a_status_without_details_or_of_another_domain_has_no_reason() {
        assert_eq!(reason_of(&Status::not_found("unknown worker id 3: register again")), None);
        let foreign = Status::with_error_details(
            Code::NotFound,
            "x",
            ErrorDetails::with_error_info("UNKNOWN_WORKER", "example.com", HashMap::new()),
        );
        assert_eq!(reason_of(&foreign), None);
    }
}
