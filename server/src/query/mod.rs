//! The query language: filters parsed to an AST (`parse`) and compiled to SQL conditions with
//! bound parameters (`compile`). Knows nothing about HTTP.

pub mod compile;
pub mod parse;

pub use compile::{Condition, Context, compile};
pub use parse::{Expr, FilterError, parse};
