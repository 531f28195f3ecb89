//! Arbitrary bytes, decoded as each convo.v1 request message (the first byte
//! picks which) and run through the validation every handler runs. Any panic
//! is a bug: no input may crash the server or turn into INTERNAL.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((kind, message)) = data.split_first() {
        let _ = convo::grpc::validate_encoded_request(*kind, message);
    }
});
