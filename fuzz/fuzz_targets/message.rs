#![no_main]
//! Fuzz target `message`: see `tests::fuzz::message`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::message(data));
