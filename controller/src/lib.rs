//! coral-controller as a library: the `ImageSeed` resource ([`crd`]) and
//! the reconciler that turns it into builder Jobs, snapshots and rollouts.

pub mod crd;
pub mod job;
pub mod lease;
pub mod metrics;
pub mod nodes;
pub mod reconcile;
pub mod rollout;

#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixtures;

#[cfg(test)]
mod tests;
