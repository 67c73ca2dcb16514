//! Records: the rows of collections, their validation, rules and HTTP API.

pub mod expand;
pub mod handlers;
pub mod rules;
pub mod store;
pub mod values;

pub use handlers::configure;
