//! The shutdown signal (P20): SIGTERM from an orchestrator, SIGINT from a terminal.

use std::future::Future;

/// A future that resolves on the first SIGTERM or SIGINT (Ctrl-C).
///
/// The handlers are installed when this function is *called*, not when the future is first
/// polled: the command line calls it before building the service, so a signal that arrives
/// during start-up is still a graceful stop and not the default "die at once".
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        async move {
            let term = async {
                match term.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = int => tracing::info!(signal = "SIGINT", "shutdown signal received"),
                _ = term => tracing::info!(signal = "SIGTERM", "shutdown signal received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!(signal = "SIGINT", "shutdown signal received");
    }
}
