//! `kernels` owns the kernel registry, keyed by `(OpKind, DType, QuantScheme, Target)`, and the CPU
//! kernels with a plain scalar reference beside each fast one.
//!
//! It is shared by compile time (selection) and run time (execution), so it never learns about
//! graphs or plans: it names only the shared vocabulary of `ir-types`. Tests sit beside each kernel
//! and compare it to its reference.
//!
//! [`registry`] is the one explicit table of kernels (`fdc kernels --list` prints it); [`cpu`]
//! holds the library kernels, one generic source per kernel compiled for each ISA level
//! (portable, AVX2, AVX-512) behind a safe entry point that takes the level as an argument;
//! [`cuda`] assembles the CUDA C sources of `kernels/cuda/` into a plan's module (compiled by fdc,
//! loaded by fdrt: this crate neither compiles nor launches them).
//! Kernels report bad shapes or indices as [`KernelError`].

pub mod cpu;
pub mod cuda;
mod error;
pub mod registry;

pub use error::KernelError;
pub use registry::{KernelEntry, KernelId, KernelKey, KernelSource};
