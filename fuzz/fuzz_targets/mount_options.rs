//! Mount option strings (`[storage] options`, fstab's fourth field): parsed or refused, and
//! what parses prints back to a string that parses to the same options.
//! The check is `artemis_sync_tools::fuzz_checks::mount_options`, which CI also replays on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| artemis_sync_tools::fuzz_checks::mount_options(data));
