//! The binary's side of the command line: what each subcommand does
//! (`commands`, and `operate` for the operator's commands on a running
//! daemon or a stopped store), the process's setup (`setup`: logging,
//! signals, runtime), everything printed (`output`, `status`, `table`),
//! several polls in a row, recorded or replayed (`rehearse`), and a
//! connector guessed from one request (`scaffold`).
//! The argument definitions are `args`; the library knows nothing
//! of this module.

pub mod args;
pub mod commands;
pub mod operate;
pub mod output;
pub mod rehearse;
pub mod scaffold;
pub mod setup;
pub mod status;
pub mod table;
