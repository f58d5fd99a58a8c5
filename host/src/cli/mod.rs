//! The subcommands besides `run`: `produce`, `dev` and `reducer new|build|check|preview`. The top layer:
//! they use the service as a user would.

pub mod dev;
pub mod explain;
pub mod preview;
pub mod produce;
pub mod reducer;
