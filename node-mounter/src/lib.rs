//! coral-node-mounter as a library: what the `coral-node-mounter` subcommands
//! run, so that `run` can chain them in one process.
//!
//! - [`mount`]: find the seed volume's device, mount it, grow it, check it;
//! - [`adopt`]: register a volume that is containerd's root, moving bytes,
//!   never copying them, or (`--mode copy`) from a volume mounted elsewhere;
//! - [`fallback`]: pull what is missing through CRI, with backoff and the
//!   kubelet's credential sources;
//! - [`prewarm`]: read the seeded files' blocks once, for EBS lazy loading;
//! - [`status`]: the status file and exit codes.

pub mod adopt;
pub mod fallback;
pub mod mount;
pub mod prewarm;
pub mod status;
