//! Integration tests: a real gateway on loopback sockets, in front of a real upstream, running
//! real policies compiled to WebAssembly. Run them with `cargo xtask test`, which builds the
//! policies first.

mod check;
mod edge;
mod llm;
mod overload;
mod policies;
mod proxy;
mod reload;
mod resilience;
mod sandbox;
