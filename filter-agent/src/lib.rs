//! filter-agent: Calico v3 host-endpoint policy, enforced with XDP and TC.
//!
//! Modules follow the data's way: [`model`] (YAML → validated resources) →
//! [`selector`] → [`compile`] (resources → classifier tables, pure) →
//! [`dataplane`] (tables → kernel maps, programs attached); [`source`] feeds
//! the model from a watched directory and [`cli`] drives it all.

pub mod cli;
pub mod compile;
pub mod dataplane;
pub mod fuzzing;
pub mod model;
pub mod node;
pub mod private;
pub mod reference;
pub mod selector;
pub mod source;
pub mod state;
