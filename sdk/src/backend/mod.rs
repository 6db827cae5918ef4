//! Where SDK handles get their data: the component bindings on wasm32, the
//! in-memory fakes of [`testing`](crate::testing) everywhere else. Both
//! backends expose the same crate-private handle types and functions, so the
//! public API is one set of types.

#[cfg(target_arch = "wasm32")]
pub mod wasm;
#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::*;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod fake;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use fake::*;
