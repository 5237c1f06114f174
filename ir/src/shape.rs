//! Shapes with symbolic dimensions.
//!
//! Dimension legend used across the IR: `T` tokens in this step (all sequences of the batch),
//! `R` rows whose logits are wanted (`R <= T`), constants for everything the model fixes.
//! Only the leading dimension of an activation is symbolic; weights are fully constant.

use crate::types::DType;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Const(usize),
    /// `T`: tokens processed in one forward pass.
    Tokens,
    /// `R`: rows whose logits the caller asked for.
    LogitRows,
}

impl Dim {
    pub fn as_const(self) -> Option<usize> {
        match self {
            Dim::Const(n) => Some(n),
            _ => None,
        }
    }

    pub fn parse(text: &str) -> Option<Dim> {
        match text {
            "T" => Some(Dim::Tokens),
            "R" => Some(Dim::LogitRows),
            _ => text.parse().ok().map(Dim::Const),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Tokens => f.write_str("T"),
            Dim::LogitRows => f.write_str("R"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// `[rows, cols]` where rows is symbolic: the shape of every activation in this IR.
    pub fn rows_cols(rows: Dim, cols: usize) -> Shape {
        Shape(vec![rows, Dim::Const(cols)])
    }

    /// The last dimension, when constant.
    pub fn last_const(&self) -> Option<usize> {
        self.0.last().and_then(|d| d.as_const())
    }

    /// Elements when every dimension is constant.
    pub fn const_elements(&self) -> Option<usize> {
        self.0.iter().map(|d| d.as_const()).product()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Element type plus shape: `f32[T, 576]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, dims: &[Dim]) -> TensorType {
        TensorType {
            dtype,
            shape: Shape(dims.to_vec()),
        }
    }

    /// An f32 activation `[rows, cols]`.
    pub fn act(rows: Dim, cols: usize) -> TensorType {
        TensorType {
            dtype: DType::F32,
            shape: Shape::rows_cols(rows, cols),
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}
