//! Any bytes as a selector: parsing and evaluating must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    filter_agent::fuzzing::parse_and_evaluate_selector(data);
});
