//! The kernel programs' own diagnostics (`--kernel-log-level`), read from
//! aya-log's ring buffer into the agent's tracing output, target
//! `filter_ebpf`, at the level the program wrote them.

use aya_log::EbpfLogger;
use tokio::sync::watch;

/// aya-log speaks the `log` crate; the agent logs with tracing.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // tracing wants its level and target as constants.
        let (module, message) = (record.target(), record.args());
        match record.level() {
            log::Level::Error => tracing::error!(target: "filter_ebpf", module, "{message}"),
            log::Level::Warn => tracing::warn!(target: "filter_ebpf", module, "{message}"),
            log::Level::Info => tracing::info!(target: "filter_ebpf", module, "{message}"),
            log::Level::Debug => tracing::debug!(target: "filter_ebpf", module, "{message}"),
            log::Level::Trace => tracing::trace!(target: "filter_ebpf", module, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Hands the kernel's messages on as they come, until `stop` turns true.
pub async fn run<T: log::Log + Send + 'static>(
    logger: EbpfLogger<T>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    super::drain_until_stopped(logger, stop, EbpfLogger::flush).await
}
