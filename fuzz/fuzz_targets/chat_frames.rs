#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bgs::fuzzing::chat_frames(data));
