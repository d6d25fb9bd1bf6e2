//! A reader that stops early (`medtvt data inspect FILE | head -1`) must end the command quietly,
//! as it ends `cat` or `grep`. Rust ignores SIGPIPE, so a write to the closed pipe fails with
//! `BrokenPipe`: `print!` then panics and a `?` on a write returns the error. Both are caught in
//! `main` for every command: no message, exit status 141 (128 + SIGPIPE, what a shell reports
//! for a command a closed pipe ended). Catching the panic, rather than restoring the default
//! SIGPIPE action, lets the stack unwind, so a local cluster's child processes are still killed by
//! its `Drop`.

use std::any::Any;
use std::process::ExitCode;

/// The exit status of a command ended by a closed output pipe.
pub const EXIT_STATUS: u8 = 141;

/// Keeps the default panic message for every panic except a failed print to a closed pipe.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_broken_pipe_panic(info.payload()) {
            default(info);
        }
    }));
}

/// Whether a panic payload is `print!`'s failure on a closed pipe. std gives no typed error for
/// it, only this message ("failed printing to stdout: Broken pipe (os error 32)").
pub fn is_broken_pipe_panic(payload: &(dyn Any + Send)) -> bool {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("");
    text.starts_with("failed printing to std") && text.contains("Broken pipe")
}

/// Whether an error returned by a command is a write to a closed pipe.
pub fn is_broken_pipe_error(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Runs a command: its error is printed as anyhow's `main` would; a closed output pipe, as an
/// error or as a panic, ends it quietly with [`EXIT_STATUS`].
pub fn run(command: impl FnOnce() -> anyhow::Result<()> + std::panic::UnwindSafe) -> ExitCode {
    match std::panic::catch_unwind(command) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(err)) if is_broken_pipe_error(&err) => ExitCode::from(EXIT_STATUS),
        Ok(Err(err)) => {
            eprintln!("Error: {err:?}");
            ExitCode::FAILURE
        }
        Err(payload) if is_broken_pipe_panic(payload.as_ref()) => ExitCode::from(EXIT_STATUS),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_recognised_as_error_and_as_panic() {
        let io = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(is_broken_pipe_error(&anyhow::Error::new(io).context("printing the report")));
        assert!(!is_broken_pipe_error(&anyhow::anyhow!("no such file")));
        let payload: Box<dyn Any + Send> =
            Box::new(String::from("failed printing to stdout: Broken pipe (os error 32)"));
        assert!(is_broken_pipe_panic(payload.as_ref()));
        let other: Box<dyn Any + Send> = Box::new("index out of bounds");
        assert!(!is_broken_pipe_panic(other.as_ref()));
    }
}
