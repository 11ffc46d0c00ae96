//! What every program's `main` does: log lines to standard error filtered by an environment
//! variable (`warn` by default) in the chosen format, one single-threaded runtime, and the error
//! chain said once on failure.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

/// Runs a program's future with logging set up from `log_env` (a filter, `warn` when unset
/// or bad) in `format`; an error is printed as `error: …` (its whole chain) and ends the
/// program with a failure code.
pub fn main<E: Display>(
    log_env: &str,
    format: crate::log::LogFormat,
    program: impl Future<Output = Result<ExitCode, E>>,
) -> ExitCode {
    let filter = std::env::var(log_env)
        .ok()
        .filter(|f| tracing_subscriber::EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| "warn".into());
    if let Err(e) = crate::log::init(&filter, format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
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
