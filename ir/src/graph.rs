//! The graph: SSA values produced by op nodes, with weights referenced by handle (never copied).
//!
//! `petgraph` holds the node-to-node dependence edges and is private to this module: passes speak
//! only of `NodeId` and `ValueId`, so the graph library can change without touching them.
//! A value is defined exactly once: by a graph input, by a weight, or as output `i` of a node.

use crate::op::{Op, ShapeError};
use crate::shape::TensorType;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

/// A tensor of the graph; prints as `%v12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// An op node; prints as `node7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%v{}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node{}", self.0)
    }
}

/// The graph outputs the compiler knows by name: the logits, and with a multi-token-prediction
/// module the main model's final hidden states (every token's, normed), the module's own and its
/// logits. The module's nodes are those only its outputs need; the plan runs them as a program
/// of their own.
pub const OUTPUT_LOGITS: &str = "logits";
pub const OUTPUT_HIDDEN: &str = "hidden";
pub const OUTPUT_MTP_HIDDEN: &str = "mtp_hidden";
pub const OUTPUT_MTP_LOGITS: &str = "mtp_logits";

/// The graph inputs the runtime fills at every step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// `i32[T]`: the tokens of this step.
    TokenIds,
    /// `i32[T]`: the position of each token in its sequence.
    Positions,
    /// `i32[R]`: which rows' logits to compute.
    LogitRows,
    /// `f32[T, C]`: hidden states supplied by the runtime, one row per token: the main model's
    /// for a multi-token-prediction module (see `models::arch::decoder`). Unlike the others it
    /// lives in the activation arena.
    Hidden,
}

impl InputKind {
    pub fn name(self) -> &'static str {
        match self {
            InputKind::TokenIds => "token_ids",
            InputKind::Positions => "positions",
            InputKind::LogitRows => "logit_rows",
            InputKind::Hidden => "hidden",
        }
    }

    pub fn parse(text: &str) -> Option<InputKind> {
        [
            InputKind::TokenIds,
            InputKind::Positions,
            InputKind::LogitRows,
            InputKind::Hidden,
        ]
        .into_iter()
        .find(|k| k.name() == text)
    }
}

/// Where a weight's data comes from: tensors of the checkpoint, by name, combined lazily.
/// The compiler materializes the expression only when it writes the plan.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightExpr {
    /// One checkpoint tensor, in its HF layout.
    Tensor(String),
    /// Row-wise concatenation (`[N1, K] ++ [N2, K] -> [N1 + N2, K]`, or of vectors).
    ConcatRows(Vec<WeightExpr>),
    /// Stacking along a new leading axis (`E x [N, K] -> [E, N, K]`): the experts of a
    /// mixture-of-experts layer. Its data is laid out as the concatenation of its parts.
    Stack(Vec<WeightExpr>),
    /// Rows of `[heads * head_dim, cols]` reordered within each head from interleaved rotary
    /// pairs `(2i, 2i + 1)` to rotate-half pairs `(i, i + head_dim / 2)`: rows `0, 2, 4, ...`
    /// then `1, 3, 5, ...`. Applied to both q and k it leaves every q.k product unchanged, so
    /// an interleaved-RoPE model runs on the rotate-half `rope` op.
    Deinterleave {
        part: Box<WeightExpr>,
        head_dim: usize,
        cols: usize,
    },
    /// Rows of `[blocks * period, cols]` with `start..start + len` of every block of `period`
    /// rows multiplied by `factor`: part of every head of a projection scaled (YaRN's attention
    /// factor on the rope part of multi-head latent attention's queries).
    ScaleRows {
        part: Box<WeightExpr>,
        period: usize,
        start: usize,
        len: usize,
        cols: usize,
        factor: f64,
    },
    /// Columns `start..start + len` of every row of `[rows, cols]`: one side of a projection
    /// of a concatenation, `W [a; b] = W[:, ..A] a + W[:, A..] b`, so the concatenation is
    /// never formed (the MTP module's `eh_proj`).
    Columns {
        part: Box<WeightExpr>,
        start: usize,
        len: usize,
        cols: usize,
    },
}

impl WeightExpr {
    /// Every checkpoint tensor this expression reads, in order.
    pub fn tensors(&self) -> Vec<&str> {
        match self {
            WeightExpr::Tensor(name) => vec![name.as_str()],
            WeightExpr::ConcatRows(parts) | WeightExpr::Stack(parts) => {
                parts.iter().flat_map(|p| p.tensors()).collect()
            }
            WeightExpr::Deinterleave { part, .. }
            | WeightExpr::ScaleRows { part, .. }
            | WeightExpr::Columns { part, .. } => part.tensors(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ValueDef {
    Input(InputKind),
    /// A weight: its plan name and where its data comes from.
    Weight {
        name: String,
        expr: WeightExpr,
    },
    /// Output `index` of `node`.
    Node {
        node: NodeId,
        index: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ValueData {
    pub ty: TensorType,
    pub def: ValueDef,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeData {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

/// A named constant array of the model (e.g. RoPE inverse frequencies), kept in f64 so the
/// plan can round once.
#[derive(Clone, Debug, PartialEq)]
pub struct Constant {
    pub name: String,
    pub values: Vec<f64>,
}

/// Errors from building or editing a graph. Always a bug in the caller (a builder or a pass).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GraphError {
    #[error("{op} at {node}: {message}")]
    Shape {
        op: &'static str,
        node: String,
        message: String,
    },
    #[error("unknown value {0}")]
    UnknownValue(ValueId),
    #[error("{0} has no producer node")]
    NotANodeOutput(ValueId),
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    values: Vec<ValueData>,
    nodes: StableDiGraph<NodeData, ()>,
    outputs: Vec<(String, ValueId)>,
    constants: Vec<Constant>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    // ---- values -------------------------------------------------------------------------------

    fn push_value(&mut self, ty: TensorType, def: ValueDef) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(ValueData { ty, def });
        id
    }

    pub fn add_input(&mut self, kind: InputKind, ty: TensorType) -> ValueId {
        self.push_value(ty, ValueDef::Input(kind))
    }

    pub fn add_weight(
        &mut self,
        name: impl Into<String>,
        ty: TensorType,
        expr: WeightExpr,
    ) -> ValueId {
        self.push_value(
            ty,
            ValueDef::Weight {
                name: name.into(),
                expr,
            },
        )
    }

    pub fn value(&self, id: ValueId) -> &ValueData {
        &self.values[id.0 as usize]
    }

    pub fn value_mut(&mut self, id: ValueId) -> &mut ValueData {
        &mut self.values[id.0 as usize]
    }

    pub fn try_value(&self, id: ValueId) -> Option<&ValueData> {
        self.values.get(id.0 as usize)
    }

    pub fn ty(&self, id: ValueId) -> &TensorType {
        &self.value(id).ty
    }

    /// All values ever created, including ones no longer used; see `live_values`.
    pub fn value_ids(&self) -> impl Iterator<Item = ValueId> {
        (0..self.values.len() as u32).map(ValueId)
    }

    pub fn input(&self, kind: InputKind) -> Option<ValueId> {
        self.value_ids()
            .find(|&v| self.value(v).def == ValueDef::Input(kind))
    }

    /// Weights that some node still reads, in creation order.
    pub fn weights(&self) -> Vec<ValueId> {
        let used = self.used_values();
        self.value_ids()
            .filter(|v| matches!(self.value(*v).def, ValueDef::Weight { .. }) && used[v.0 as usize])
            .collect()
    }

    fn used_values(&self) -> Vec<bool> {
        let mut used = vec![false; self.values.len()];
        for n in self.nodes.node_weights() {
            for v in &n.inputs {
                used[v.0 as usize] = true;
            }
        }
        for (_, v) in &self.outputs {
            used[v.0 as usize] = true;
        }
        used
    }

    // ---- constants and outputs ------------------------------------------------------------------

    pub fn add_constant(&mut self, name: impl Into<String>, values: Vec<f64>) {
        self.constants.push(Constant {
            name: name.into(),
            values,
        });
    }

    pub fn constants(&self) -> &[Constant] {
        &self.constants
    }

    pub fn constant(&self, name: &str) -> Option<&Constant> {
        self.constants.iter().find(|c| c.name == name)
    }

    pub fn set_output(&mut self, name: impl Into<String>, value: ValueId) {
        let name = name.into();
        self.outputs.retain(|(n, _)| *n != name);
        self.outputs.push((name, value));
    }

    pub fn outputs(&self) -> &[(String, ValueId)] {
        &self.outputs
    }

    // ---- nodes --------------------------------------------------------------------------------

    /// Adds a node, inferring its output types from the op table.
    pub fn add_node(&mut self, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>, GraphError> {
        for &v in inputs {
            if self.try_value(v).is_none() {
                return Err(GraphError::UnknownValue(v));
            }
        }
        let types: Vec<&TensorType> = inputs.iter().map(|&v| self.ty(v)).collect();
        let out_types = op
            .infer(&types)
            .map_err(|ShapeError(message)| GraphError::Shape {
                op: op.name(),
                node: format!("node{}", self.nodes.node_bound()),
                message,
            })?;
        let index = self.nodes.add_node(NodeData {
            op,
            inputs: inputs.to_vec(),
            outputs: vec![],
        });
        let node = NodeId(index.index() as u32);
        let outputs: Vec<ValueId> = out_types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| self.push_value(ty, ValueDef::Node { node, index: i }))
            .collect();
        self.nodes[index].outputs = outputs.clone();
        for &v in inputs {
            self.link(v, index);
        }
        Ok(outputs)
    }

    /// Adds a node with exactly one output.
    pub fn add_node1(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, GraphError> {
        Ok(self.add_node(op, inputs)?[0])
    }

    fn link(&mut self, value: ValueId, consumer: NodeIndex) {
        if let ValueDef::Node { node, .. } = self.value(value).def {
            let producer = NodeIndex::new(node.0 as usize);
            if self.nodes.find_edge(producer, consumer).is_none() {
                self.nodes.add_edge(producer, consumer, ());
            }
        }
    }

    fn relink_inputs(&mut self, index: NodeIndex) {
        let incoming: Vec<_> = self
            .nodes
            .edges_directed(index, Direction::Incoming)
            .map(|e| e.id())
            .collect();
        for e in incoming {
            self.nodes.remove_edge(e);
        }
        for v in self.nodes[index].inputs.clone() {
            self.link(v, index);
        }
    }

    pub fn node(&self, id: NodeId) -> &NodeData {
        &self.nodes[NodeIndex::new(id.0 as usize)]
    }

    pub fn contains_node(&self, id: NodeId) -> bool {
        self.nodes.contains_node(NodeIndex::new(id.0 as usize))
    }

    /// The live node producing `value`, if a node does.
    pub fn producer(&self, value: ValueId) -> Option<NodeId> {
        match self.value(value).def {
            ValueDef::Node { node, index } if self.is_output_of(value, node, index) => Some(node),
            _ => None,
        }
    }

    /// Whether `value` is still defined: an input, a weight, or an output of a live node.
    /// (Node slots are reused after removal, so a removed node's values must be checked
    /// against the node that holds the slot now.)
    pub fn is_live(&self, value: ValueId) -> bool {
        match self.value(value).def {
            ValueDef::Node { node, index } => self.is_output_of(value, node, index),
            _ => true,
        }
    }

    fn is_output_of(&self, value: ValueId, node: NodeId, index: usize) -> bool {
        self.contains_node(node) && self.node(node).outputs.get(index) == Some(&value)
    }

    /// Nodes reading `value`, in id order (a node reading it twice appears once).
    pub fn users(&self, value: ValueId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .nodes
            .node_indices()
            .filter(|&i| self.nodes[i].inputs.contains(&value))
            .map(|i| NodeId(i.index() as u32))
            .collect();
        users.sort();
        users
    }

    /// Whether `value` is a graph output.
    pub fn is_output(&self, value: ValueId) -> bool {
        self.outputs.iter().any(|(_, v)| *v == value)
    }

    /// Makes every reader of `old` (nodes and graph outputs) read `new` instead.
    pub fn replace_all_uses(&mut self, old: ValueId, new: ValueId) {
        let readers: Vec<NodeIndex> = self
            .nodes
            .node_indices()
            .filter(|&i| self.nodes[i].inputs.contains(&old))
            .collect();
        for index in readers {
            for v in self.nodes[index].inputs.iter_mut() {
                if *v == old {
                    *v = new;
                }
            }
            self.relink_inputs(index);
        }
        for (_, v) in self.outputs.iter_mut() {
            if *v == old {
                *v = new;
            }
        }
    }

    /// Replaces one operand of a node.
    pub fn set_input(&mut self, node: NodeId, operand: usize, value: ValueId) {
        let index = NodeIndex::new(node.0 as usize);
        self.nodes[index].inputs[operand] = value;
        self.relink_inputs(index);
    }

    /// Removes a node. Its outputs must have no readers left.
    pub fn remove_node(&mut self, id: NodeId) {
        self.nodes.remove_node(NodeIndex::new(id.0 as usize));
    }

    /// Removes nodes whose outputs nobody reads, repeatedly. Returns how many went.
    pub fn remove_dead_nodes(&mut self) -> usize {
        let mut removed = 0;
        loop {
            let used = self.used_values();
            let dead: Vec<NodeIndex> = self
                .nodes
                .node_indices()
                .filter(|&i| self.nodes[i].outputs.iter().all(|v| !used[v.0 as usize]))
                .collect();
            if dead.is_empty() {
                return removed;
            }
            for i in dead {
                self.nodes.remove_node(i);
                removed += 1;
            }
        }
    }

    pub fn node_count(&self) -> usize {
        self.nodes.node_count()
    }

    /// Nodes in a deterministic topological order: among ready nodes, the lowest id first, so
    /// the order follows the builder's wherever dependences allow.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let mut pending: Vec<usize> = vec![0; self.nodes.node_bound()];
        let mut ready = BinaryHeap::new();
        for i in self.nodes.node_indices() {
            pending[i.index()] = self.nodes.edges_directed(i, Direction::Incoming).count();
            if pending[i.index()] == 0 {
                ready.push(Reverse(i.index()));
            }
        }
        let mut order = Vec::with_capacity(self.nodes.node_count());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(NodeId(i as u32));
            for next in self
                .nodes
                .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
            {
                pending[next.index()] -= 1;
                if pending[next.index()] == 0 {
                    ready.push(Reverse(next.index()));
                }
            }
        }
        order
    }
}
