//! Where resources come from: a watched policy directory ([`dir`]) and the
//! Kubernetes API ([`kube`]). Each source tells the agent that something
//! changed; the agent then takes every source's resources as they are now
//! and compiles them into one policy.

pub mod dir;
pub mod kube;

pub use dir::{watch, DirWatch};
