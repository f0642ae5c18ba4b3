#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| evio_fuzz::portmap(data));
