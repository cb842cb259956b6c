//! The coral seed volume format, shared by the builder, the node mounter and
//! the controller: content digests and layer identities, platforms, image
//! references, the seed manifest, the on-volume paths, and the exact tree
//! copy both the builder (a volume built on a previous one) and the node
//! (copy mode) use to put layer trees in place.
//!
//! This crate is small on purpose: it is linked into the node binary, so it
//! must never pull in async runtimes, network clients or cloud SDKs.

pub mod copytree;
pub mod digest;
pub mod manifest;
pub mod paths;
pub mod platform;
pub mod reference;
pub mod time;
pub mod tree;

pub use digest::{Algorithm, ChainId, DiffId, Digest, DigestError};
pub use manifest::{FormatVersion, ManifestError, SeedImage, SeedLayer, SeedManifest, Totals};
pub use paths::SeedLayout;
pub use platform::{Platform, PlatformError};
pub use reference::{Reference, ReferenceError};
