//! The command-line room (moving in: the next commit gives it its files).

pub mod args;
pub mod top;

pub use args::*;
