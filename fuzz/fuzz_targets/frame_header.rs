#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgrelay_fuzz::targets::frame_header(data));
