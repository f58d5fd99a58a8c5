//! The subcommands besides `run`: `produce`, `dev` and `reducer new|build|check`. The top layer:
//! they use the service as a user would.

pub mod dev;
pub mod produce;
pub mod reducer;
