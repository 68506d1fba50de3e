//! Embeds the kernel object built by `cargo xtask build-ebpf`.
//!
//! The object path is `FILTER_EBPF_OBJECT` when set, else the kernel crate's
//! release output. Without it the agent still compiles (so `cargo check`
//! and clippy work on a fresh clone) and says at start-up how to build it.

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("FILTER_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest.join("../filter-ebpf/target/bpfel-unknown-none/release/filter-ebpf")
        });
    println!("cargo:rerun-if-env-changed=FILTER_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("filter-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("write OUT_DIR"),
        Err(_) => {
            println!(
                "cargo:warning=kernel object {} not found; run `cargo xtask build-ebpf` (the agent will refuse to start)",
                object.display()
            );
            fs::write(&out, []).expect("write OUT_DIR");
        }
    }
}
