//! What the dataplane reports packet by packet: Log records, read from
//! the kernel's ring buffer ([`reader`]) and printed as the kernel's LOG
//! line ([`logline`]).

pub mod logline;
pub mod reader;
