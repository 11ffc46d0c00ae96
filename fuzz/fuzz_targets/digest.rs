#![no_main]
//! Fuzz target `digest`: see `tests::fuzz::digest_headers`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::digest_headers(data));
