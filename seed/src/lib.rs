//! The coral seed volume format, shared by the builder, the node mounter and
//! the controller: content digests and layer identities, platforms, image
//! references, the seed manifest, and the on-volume paths.
//!
//! This crate is small on purpose: it is linked into the node binary, so it
//! must never pull in async runtimes, network clients or cloud SDKs.

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
