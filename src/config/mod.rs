//! Configuration: `bridge.yaml` and connector files.
//!
//! Three stages, each in its own file:
//! - [`env`]: `${VAR}` substitution on the text (keeps line numbers);
//! - [`raw`]: serde types as written, with location-carrying errors;
//! - [`resolve`]: validation into the runtime types below, which are all
//!   the rest of pollhook ever sees.
//!
//! - [`operator`]: the few fields operator commands need, readable without
//!   the daemon's whole environment.
//!
//! Nothing here does network I/O; loading reads files and the environment.

pub mod env;
pub mod error;
pub mod operator;
pub mod raw;
pub mod resolve;
pub mod schema;

pub use error::{ConfigError, ConfigErrors};
pub use operator::{load_operator, OperatorConfig};
pub use resolve::*;
