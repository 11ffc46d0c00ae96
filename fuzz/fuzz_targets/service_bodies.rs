#![no_main]
//! Fuzz target `service_bodies`: see `tests::fuzz::service_bodies`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::service_bodies(data));
