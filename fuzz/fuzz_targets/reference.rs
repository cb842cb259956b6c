#![no_main]
//! cargo fuzz target: [`coral_builder::fuzzing::reference`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| coral_builder::fuzzing::reference(data));
