pub mod fallback;
pub mod status;
