//! What the dataplane reports packet by packet: Log records, read from
//! the kernel's ring buffer ([`reader`]), printed as the kernel's LOG line
//! ([`logline`]) and served as JSON to `filter-agent logs` ([`stream`]);
//! and the kernel programs' own diagnostics ([`diag`]).

pub mod diag;
pub mod logline;
pub mod reader;
pub mod stream;

/// Calls `drain` on `source` each time its descriptor is readable (a ring
/// buffer the kernel has written to), until `stop` turns true or its
/// sender goes: the loop of both ring readers.
pub(crate) async fn drain_until_stopped<T: std::os::fd::AsRawFd>(
    source: T,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut drain: impl FnMut(&mut T),
) -> std::io::Result<()> {
    // SAFETY: `source` owns its descriptor, which stays open and the same
    // until the AsyncFd (which owns `source`) is dropped.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register(source) }?;
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = ready?;
                drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            r = stop.changed() => if r.is_err() || *stop.borrow() { return Ok(()) },
        }
    }
}
