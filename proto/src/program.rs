//! What every program's `main` does: log lines to standard error filtered by an environment
//! variable (`warn` by default), one single-threaded runtime, and the error chain said once on
//! failure.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

/// Runs a program's future with logging set up from `log_env`; an error is printed as
/// `error: …` (its whole chain) and ends the program with a failure code.
pub fn main<E: Display>(
    log_env: &str,
    program: impl Future<Output = Result<ExitCode, E>>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(log_env).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(crate::log::colours())
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(program) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
