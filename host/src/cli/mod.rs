//! The subcommands besides `run`: `produce`, `dev` and `reducer check`. The top layer:
//! they use the service as a user would.

pub mod dev;
pub mod produce;
