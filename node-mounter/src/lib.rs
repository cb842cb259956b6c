//! coral-node-mounter as a library: what the `coral-node-mounter` subcommands
//! run, so that `run` can chain them in one process.

pub mod mount;
