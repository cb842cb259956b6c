//! coral-builder: turns a set of images into a seed volume.
//!
//! The library never prints to the terminal except through [`progress`]; the
//! binary (`main.rs`) parses arguments, sets up logging and progress, and
//! calls into it.

pub mod auth;
pub mod base;
pub mod build;
pub mod ext4bulk;
pub mod feed;
pub mod fsimage;
#[doc(hidden)]
pub mod fuzzing;
pub mod progress;
pub mod registry;
pub mod resolve;
pub mod units;
pub mod unpack;
pub mod verify;
