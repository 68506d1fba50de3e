//! What the dataplane reports packet by packet: the kernel's LOG line for
//! packets a `Log` rule matched ([`logline`]).

pub mod logline;
