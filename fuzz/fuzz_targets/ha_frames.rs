#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bgs::fuzzing::ha_frames(data));
