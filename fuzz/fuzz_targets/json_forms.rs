#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bgs::fuzzing::json_forms(data));
