//! Collections: definitions (fields, indexes, rules), their storage in `_collections`, and the
//! admin-only HTTP API.

pub mod handlers;
pub mod model;
pub mod store;

pub use handlers::configure;
