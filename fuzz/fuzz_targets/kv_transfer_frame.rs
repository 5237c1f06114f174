//! A KV transfer frame between a prefill and a decode instance (`runtime::disagg::wire`), as
//! received: the bytes as they come (damage must be refused by the checksum), and the same
//! bytes behind a valid checksum, so the fuzzer reaches the message parsers the checksum guards
//! (a fuzzer cannot forge a 128-bit checksum). Every frame must decode to a message or an error, and a
//! decoded message must encode back to the frame that carried it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::disagg::wire::{checksum, Message};

fuzz_target!(|data: &[u8]| {
    let _ = Message::decode(data.to_vec().into());
    let mut framed = data.to_vec();
    framed.extend_from_slice(&checksum(&[data]));
    if let Ok(message) = Message::decode(framed.into()) {
        let again =
            Message::decode(message.encode().into()).expect("an encoded message decodes");
        assert_eq!(again, message);
    }
});
