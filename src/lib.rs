//! arcface_rs: fused margin-softmax heads for face recognition.
//!
//! The core modules (`margin`, `head`) are plain Rust over `ndarray` views and know nothing of
//! Python; `python` (behind the `python` feature, which maturin enables) holds the thin
//! bindings that validate, convert, release the GIL and call the core.

pub mod center;
pub mod error;
pub mod evaluation;
pub mod fork_gate;
pub mod gemm;
pub mod head;
pub mod kernels;
pub mod limits;
pub mod margin;
pub mod metrics;
mod pages;
pub mod pool;
pub mod real;
pub mod search;
pub mod triplet;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
pub use head::{
    apply_margin, apply_margin_backward, margin_logits, margin_logits_backward,
    margin_logits_backward_with, margin_logits_with, margin_loss, margin_loss_with, GradFilter,
    HeadOptions, LossOptions, LossOutput, Reduction,
};
pub use margin::{HardNegatives, HardRule, Margin, Margins, RowContext, Scale, Target};
pub use real::Real;
