//! coral-node-mounter: makes a seed volume's images ready in the node's
//! containerd at bootstrap, and pulls through CRI whatever is missing.

pub mod adopt;
