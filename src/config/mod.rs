//! Configuration: `bridge.yaml` and connector files.
//!
//! Three stages:
//! - [`env`](mod@env): `${VAR}` substitution in the parsed scalars, written back
//!   escaped (a value is one scalar whatever it holds; keeps line numbers);
//! - [`raw`]: serde types as written, with location-carrying errors;
//! - [`resolve`]: validation into the runtime types, which are all the rest
//!   of pollhook ever sees. `Config` is here; the others live with their
//!   users (`crate::runtime`'s `Source` and `Route`,
//!   `crate::connector::spec`, `crate::deliver::policy`, `crate::quota`;
//!   `Source`, `Route` and `Instance` are re-exported here), so the
//!   dependency goes one way: `config` builds them, and nothing outside
//!   `config` names `raw`.
//!
//! Besides, [`operator`] reads the few fields operator commands need,
//! without the daemon's whole environment.
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
