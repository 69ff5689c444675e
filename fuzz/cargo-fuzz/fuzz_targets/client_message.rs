#![no_main]
//! libFuzzer entry of `gs_fuzz::client_message` (see fuzz/src/lib.rs).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gs_fuzz::client_message(data);
});
