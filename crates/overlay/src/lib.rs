//! The overlay's protocol core, free of I/O (docs/overlay-design.md): every
//! function takes the current time and bytes and returns decisions or writes
//! into buffers the caller owns, so it is unit-testable and the agent's data
//! plane stays allocation-free per frame.

#[cfg(test)]
mod alloc_count;
pub mod bucket;
pub mod crypto;
pub mod engine;
pub mod family;
pub mod hunt;
pub mod l2;
pub mod nat;
pub mod offload;
pub mod packet;
pub mod path;
pub mod portmap;
pub mod punch;
pub mod reason;
pub mod replay;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod stack;
mod timers;
pub mod tunnel;
pub mod wire;
