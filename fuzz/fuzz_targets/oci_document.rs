#![no_main]
//! cargo fuzz target: [`coral_builder::fuzzing::oci_document`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| coral_builder::fuzzing::oci_document(data));
