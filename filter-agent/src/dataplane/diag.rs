//! The kernel programs' own diagnostics (filter-ebpf's `diag`): how loud
//! they are, fixed when the object is loaded, and their aya-log reader.

use super::*;

/// The most verbose diagnostics the kernel programs write. `Off`, the
/// default, makes the verifier remove them from the programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KernelLogLevel {
    /// None.
    #[default]
    Off,
    /// What should not happen and changes verdicts (inconsistent tables).
    Error,
    /// What should not happen and costs state (a refused conntrack entry).
    Warn,
    /// Also informational messages.
    Info,
    /// Also debugging messages.
    Debug,
    /// Everything.
    Trace,
}

impl KernelLogLevel {
    /// The value of aya-log's `AYA_LOG_LEVEL` in the object.
    pub(super) fn global(self) -> u8 {
        use aya_log::Level;
        match self {
            KernelLogLevel::Off => 0,
            KernelLogLevel::Error => Level::Error as u8,
            KernelLogLevel::Warn => Level::Warn as u8,
            KernelLogLevel::Info => Level::Info as u8,
            KernelLogLevel::Debug => Level::Debug as u8,
            KernelLogLevel::Trace => Level::Trace as u8,
        }
    }
}

impl Dataplane {
    /// Takes the programs' diagnostics ring (aya-log) out of the
    /// dataplane, for a reader that hands each message to `logger` (it can
    /// be taken once). The reader must be kept: the ring closes with it.
    pub fn take_kernel_log<T: log::Log>(
        &mut self,
        logger: T,
    ) -> Result<aya_log::EbpfLogger<T>, Error> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger).map_err(|e| Error::Load {
            what: "aya-log ring buffer".into(),
            source: Box::new(e),
        })
    }
}
