#![no_main]
//! Fuzz target `relay_datagram`: see `tests::fuzz::relay_datagram`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tests::fuzz::relay_datagram(data));
