//! The header each tunnel stream starts with, and datagram framing: any bytes decode to a header
//! or an error; a header that decodes encodes back to the same bytes' meaning.
#![no_main]

use kakuremichi_proto::{frame_datagram, StreamHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.get(..StreamHeader::LEN) {
        let mut arr = [0u8; StreamHeader::LEN];
        arr.copy_from_slice(bytes);
        if let Ok(h) = StreamHeader::decode(&arr) {
            let again = StreamHeader::decode(&h.encode()).expect("an encoded header decodes");
            assert_eq!(h, again);
        }
    }
    if let Some(framed) = frame_datagram(data) {
        assert!(framed.len() >= data.len());
    }
});
