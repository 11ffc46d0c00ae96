//! The signals that stop the agent (and its demo shop): Ctrl-C and SIGTERM.

/// Ctrl-C or SIGTERM.
pub(crate) async fn stop() {
    tokio::select! {
        () = interrupted() => {}
        () = terminated() => {}
    }
}

/// Ctrl-C (never, if the handler cannot be installed).
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await
    }
}

/// SIGTERM (never, if the handler cannot be installed).
#[cfg(unix)]
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn terminated() {
    std::future::pending::<()>().await
}
