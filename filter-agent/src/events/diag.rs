//! The kernel programs' own diagnostics (`--kernel-log-level`), read from
//! aya-log's ring buffer into the agent's tracing output, target
//! `filter_ebpf`, at the level the program wrote them.

use aya_log::EbpfLogger;
use tokio::{io::unix::AsyncFd, sync::watch};

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
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // SAFETY: the logger owns its ring's descriptor, which stays open and
    // the same until the AsyncFd (which owns the logger) is dropped.
    let mut fd = unsafe { AsyncFd::register(logger) }?;
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = ready?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
        }
    }
}
