//! Any bytes as a policy file: load, validate and compile must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    filter_agent::fuzzing::load_validate_compile(data);
});
