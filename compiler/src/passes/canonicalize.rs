//! `canonicalize`: removes nodes whose results nobody reads.
//!
//! It does not reorder, fuse or change any op; later passes rely on it to start from a graph with
//! no dead code.

use super::{PassCtx, PassError};
use ir::Graph;

pub fn run(graph: &mut Graph, _ctx: &PassCtx) -> Result<(), PassError> {
    graph.remove_dead_nodes();
    Ok(())
}
