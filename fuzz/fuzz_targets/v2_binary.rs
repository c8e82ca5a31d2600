//! See `visionserve::fuzz_checks::v2_binary` for what this target checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| visionserve::fuzz_checks::v2_binary(data));
