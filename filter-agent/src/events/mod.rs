//! What the dataplane reports packet by packet: Log records, read from
//! the kernel's ring buffer ([`reader`]), printed as the kernel's LOG line
//! ([`logline`]) and served as JSON to `filter-agent logs` ([`stream`]);
//! and the kernel programs' own diagnostics ([`diag`]).

pub mod diag;
pub mod logline;
pub mod reader;
pub mod stream;
