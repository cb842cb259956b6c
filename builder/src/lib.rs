//! coral-builder: turns a set of images into a seed volume.
//!
//! The library never prints to the terminal; the binary (`main.rs`) parses
//! arguments, sets up logging and progress, and calls into it.

pub mod fsimage;
pub mod unpack;
