#![no_main]
//! libFuzzer entry of `gs_fuzz::decide` (see fuzz/src/lib.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gs_fuzz::decide(data);
});
