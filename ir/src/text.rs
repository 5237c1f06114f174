//! The IR's text form: a printer and a parser, so every compiler test is "text in, text out".
//!
//! ```text
//! graph tiny {
//!   input %v0: i32[T] = token_ids
//!   const rope_inv_freq = [1.0, 0.1]
//!   weight %v1: f32[320, 64] = @model.embed_tokens.weight
//!   weight %v2: f32[96, 64] = concat(@a.weight, @b.weight) named @ab.weight
//!   %v3: f32[T, 64] = embedding(%v1, %v0)
//!   %v4: f32[T, 32], %v5: f32[T, 32] = split(%v3) {sizes=[32, 32]}
//!   output hidden = %v3
//! }
//! ```
//! The printer renumbers values in order of appearance and prints nodes in `topo_order`, so
//! `print(parse(print(g))) == print(g)` and dumps stay stable while passes add and remove nodes.

use crate::graph::{Graph, InputKind, ValueDef, ValueId, WeightExpr};
use crate::op::Op;
use crate::shape::{Dim, Shape, TensorType};
use crate::types::DType;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Prints the graph in its text form.
pub fn print(graph: &Graph) -> String {
    let mut names: HashMap<ValueId, usize> = HashMap::new();
    let name = |v: ValueId, names: &mut HashMap<ValueId, usize>| -> String {
        let next = names.len();
        format!("%v{}", *names.entry(v).or_insert(next))
    };
    let mut out = String::new();
    let _ = writeln!(out, "graph {} {{", graph.name);
    for v in graph.value_ids() {
        if let ValueDef::Input(kind) = graph.value(v).def {
            let _ = writeln!(
                out,
                "  input {}: {} = {}",
                name(v, &mut names),
                graph.ty(v),
                kind.name()
            );
        }
    }
    for c in graph.constants() {
        let values: Vec<String> = c.values.iter().map(|x| format!("{x:?}")).collect();
        let _ = writeln!(out, "  const {} = [{}]", c.name, values.join(", "));
    }
    for v in graph.weights() {
        if let ValueDef::Weight {
            name: weight_name,
            expr,
        } = &graph.value(v).def
        {
            let expr_text = print_expr(expr);
            let suffix = match expr {
                WeightExpr::Tensor(t) if t == weight_name => String::new(),
                _ => format!(" named @{weight_name}"),
            };
            let _ = writeln!(
                out,
                "  weight {}: {} = {expr_text}{suffix}",
                name(v, &mut names),
                graph.ty(v)
            );
        }
    }
    for node_id in graph.topo_order() {
        let node = graph.node(node_id);
        let inputs: Vec<String> = node.inputs.iter().map(|&v| name(v, &mut names)).collect();
        let outputs: Vec<String> = node
            .outputs
            .iter()
            .map(|&v| format!("{}: {}", name(v, &mut names), graph.ty(v)))
            .collect();
        let attrs = node.op.attrs();
        let attrs_text = if attrs.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!(" {{{}}}", parts.join(", "))
        };
        let _ = writeln!(
            out,
            "  {} = {}({}){attrs_text}",
            outputs.join(", "),
            node.op.name(),
            inputs.join(", ")
        );
    }
    for (output_name, v) in graph.outputs() {
        let _ = writeln!(out, "  output {output_name} = {}", name(*v, &mut names));
    }
    out.push_str("}\n");
    out
}

fn print_expr(expr: &WeightExpr) -> String {
    match expr {
        WeightExpr::Tensor(t) => format!("@{t}"),
        WeightExpr::ConcatRows(parts) => {
            let parts: Vec<String> = parts.iter().map(print_expr).collect();
            format!("concat({})", parts.join(", "))
        }
        WeightExpr::Stack(parts) => {
            let parts: Vec<String> = parts.iter().map(print_expr).collect();
            format!("stack({})", parts.join(", "))
        }
        WeightExpr::Deinterleave {
            part,
            head_dim,
            cols,
        } => format!("deinterleave({}, {head_dim}, {cols})", print_expr(part)),
        WeightExpr::ScaleRows {
            part,
            period,
            start,
            len,
            cols,
            factor,
        } => format!(
            "scale_rows({}, {period}, {start}, {len}, {cols}, {factor:?})",
            print_expr(part)
        ),
        WeightExpr::Columns {
            part,
            start,
            len,
            cols,
        } => format!("columns({}, {start}, {len}, {cols})", print_expr(part)),
    }
}

/// A parse failure: line number (1-based) and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Parses the text form back into a graph, checking every node against the op table.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut graph: Option<Graph> = None;
    let mut values: HashMap<String, ValueId> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let fail = |message: String| ParseError {
            line: line_no,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with("//") || line == "}" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("graph ") {
            let name = rest.trim_end_matches('{').trim();
            graph = Some(Graph::new(name));
            continue;
        }
        let g = graph
            .as_mut()
            .ok_or_else(|| fail("expected `graph NAME {` first".into()))?;
        let lookup =
            |values: &HashMap<String, ValueId>, name: &str| -> Result<ValueId, ParseError> {
                values
                    .get(name.trim())
                    .copied()
                    .ok_or_else(|| fail(format!("unknown value {}", name.trim())))
            };
        if let Some(rest) = line.strip_prefix("input ") {
            let (lhs, kind) =
                split_once(rest, " = ").ok_or_else(|| fail("input needs `= kind`".into()))?;
            let (name, ty) = parse_typed(lhs).map_err(fail)?;
            let kind = InputKind::parse(kind.trim())
                .ok_or_else(|| fail(format!("unknown input {kind}")))?;
            values.insert(name, g.add_input(kind, ty));
        } else if let Some(rest) = line.strip_prefix("const ") {
            let (name, list) =
                split_once(rest, " = ").ok_or_else(|| fail("const needs `= [..]`".into()))?;
            let inner = list
                .trim()
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .ok_or_else(|| fail("const values must be a [list]".into()))?;
            let numbers = if inner.trim().is_empty() {
                vec![]
            } else {
                inner
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<f64>()
                            .map_err(|_| fail(format!("bad number {s:?}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
            g.add_constant(name.trim(), numbers);
        } else if let Some(rest) = line.strip_prefix("weight ") {
            let (lhs, rhs) =
                split_once(rest, " = ").ok_or_else(|| fail("weight needs `= expr`".into()))?;
            let (name, ty) = parse_typed(lhs).map_err(fail)?;
            let (expr_text, weight_name) = match split_once(rhs, " named @") {
                Some((e, n)) => (e, Some(n.trim().to_string())),
                None => (rhs, None),
            };
            let (expr, rest) = parse_expr(expr_text.trim()).map_err(fail)?;
            if !rest.trim().is_empty() {
                return Err(fail(format!("unexpected {rest:?} after weight expression")));
            }
            let weight_name = match (weight_name, &expr) {
                (Some(n), _) => n,
                (None, WeightExpr::Tensor(t)) => t.clone(),
                (None, _) => return Err(fail("a combined weight needs `named @NAME`".into())),
            };
            values.insert(name, g.add_weight(weight_name, ty, expr));
        } else if let Some(rest) = line.strip_prefix("output ") {
            let (name, value) =
                split_once(rest, " = ").ok_or_else(|| fail("output needs `= %v`".into()))?;
            let v = lookup(&values, value)?;
            g.set_output(name.trim(), v);
        } else {
            let (lhs, rhs) =
                split_once(line, " = ").ok_or_else(|| fail(format!("cannot read {line:?}")))?;
            let open = rhs
                .find('(')
                .ok_or_else(|| fail("expected op(operands)".into()))?;
            let close = rhs.find(')').ok_or_else(|| fail("missing `)`".into()))?;
            let op_name = rhs[..open].trim();
            let operands: Vec<ValueId> = rhs[open + 1..close]
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| lookup(&values, s))
                .collect::<Result<_, _>>()?;
            let attrs = parse_attrs(rhs[close + 1..].trim()).map_err(fail)?;
            let op = Op::from_text(op_name, &attrs).map_err(fail)?;
            let declared: Vec<(String, TensorType)> = split_top_level(lhs)
                .iter()
                .map(|s| parse_typed(s))
                .collect::<Result<_, _>>()
                .map_err(fail)?;
            let outputs = g.add_node(op, &operands).map_err(|e| fail(e.to_string()))?;
            if outputs.len() != declared.len() {
                return Err(fail(format!(
                    "{op_name} has {} outputs, {} declared",
                    outputs.len(),
                    declared.len()
                )));
            }
            for ((name, ty), v) in declared.into_iter().zip(outputs) {
                if *g.ty(v) != ty {
                    return Err(fail(format!(
                        "{name} declared {ty} but {op_name} gives {}",
                        g.ty(v)
                    )));
                }
                values.insert(name, v);
            }
        }
    }
    graph.ok_or(ParseError {
        line: 0,
        message: "empty input: no graph".into(),
    })
}

fn split_once<'a>(text: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    text.find(sep).map(|i| (&text[..i], &text[i + sep.len()..]))
}

/// Splits on commas that are not inside brackets or parentheses.
fn split_top_level(text: &str) -> Vec<String> {
    let mut parts = vec![];
    let mut depth = 0i32;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(current.trim().to_string());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        parts.push(current.trim().to_string());
    }
    parts
}

/// `%v3: f32[T, 64]` -> ("%v3", type)
fn parse_typed(text: &str) -> Result<(String, TensorType), String> {
    let (name, ty) =
        split_once(text, ":").ok_or_else(|| format!("expected `%v: type` in {text:?}"))?;
    Ok((name.trim().to_string(), parse_type(ty.trim())?))
}

fn parse_type(text: &str) -> Result<TensorType, String> {
    let open = text
        .find('[')
        .ok_or_else(|| format!("expected dtype[dims] in {text:?}"))?;
    let dtype = DType::parse(&text[..open]).ok_or_else(|| format!("unknown dtype in {text:?}"))?;
    let inner = text[open + 1..]
        .strip_suffix(']')
        .ok_or_else(|| format!("missing `]` in {text:?}"))?;
    let dims = inner
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| Dim::parse(s.trim()).ok_or_else(|| format!("bad dimension {s:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorType {
        dtype,
        shape: Shape(dims),
    })
}

/// The `n` comma-separated arguments after an expression operand (`, a, b)`), and the text
/// after the closing parenthesis; `form` names the expected spelling in errors.
fn expr_arguments<'t>(
    text: &'t str,
    form: &str,
    n: usize,
) -> Result<(Vec<&'t str>, &'t str), String> {
    let mut args = Vec::with_capacity(n);
    let mut after = text;
    for _ in 0..n {
        let rest = after
            .trim_start()
            .strip_prefix(',')
            .ok_or_else(|| format!("expected {form}, found {after:?}"))?
            .trim_start();
        let end = rest.find([',', ')']).unwrap_or(rest.len());
        args.push(rest[..end].trim());
        after = &rest[end..];
    }
    let after = after
        .trim_start()
        .strip_prefix(')')
        .ok_or_else(|| format!("expected `)` closing {form}, found {after:?}"))?;
    Ok((args, after))
}

fn number(text: &str) -> Result<usize, String> {
    text.parse()
        .map_err(|_| format!("bad number {text:?} in a weight expression"))
}

fn parse_expr(text: &str) -> Result<(WeightExpr, &str), String> {
    if let Some(rest) = text.strip_prefix("deinterleave(") {
        let (part, after) = parse_expr(rest.trim_start())?;
        let (numbers, after) = expr_arguments(after, "deinterleave(expr, head_dim, cols)", 2)?;
        let [head_dim, cols] = [number(numbers[0])?, number(numbers[1])?];
        let expr = WeightExpr::Deinterleave {
            part: Box::new(part),
            head_dim,
            cols,
        };
        return Ok((expr, after));
    }
    if let Some(rest) = text.strip_prefix("scale_rows(") {
        let (part, after) = parse_expr(rest.trim_start())?;
        let (args, after) = expr_arguments(
            after,
            "scale_rows(expr, period, start, len, cols, factor)",
            5,
        )?;
        let factor = args[4]
            .parse()
            .map_err(|_| format!("bad factor {:?} in scale_rows", args[4]))?;
        let expr = WeightExpr::ScaleRows {
            part: Box::new(part),
            period: number(args[0])?,
            start: number(args[1])?,
            len: number(args[2])?,
            cols: number(args[3])?,
            factor,
        };
        return Ok((expr, after));
    }
    if let Some(rest) = text.strip_prefix("columns(") {
        let (part, after) = parse_expr(rest.trim_start())?;
        let (numbers, after) = expr_arguments(after, "columns(expr, start, len, cols)", 3)?;
        let expr = WeightExpr::Columns {
            part: Box::new(part),
            start: number(numbers[0])?,
            len: number(numbers[1])?,
            cols: number(numbers[2])?,
        };
        return Ok((expr, after));
    }
    let combined = if let Some(rest) = text.strip_prefix("concat(") {
        Some((rest, "concat"))
    } else {
        text.strip_prefix("stack(").map(|rest| (rest, "stack"))
    };
    if let Some((rest, kind)) = combined {
        let mut parts = vec![];
        let mut rest = rest.trim_start();
        loop {
            let (part, after) = parse_expr(rest)?;
            parts.push(part);
            let after = after.trim_start();
            if let Some(after) = after.strip_prefix(',') {
                rest = after.trim_start();
            } else if let Some(after) = after.strip_prefix(')') {
                let expr = if kind == "stack" {
                    WeightExpr::Stack(parts)
                } else {
                    WeightExpr::ConcatRows(parts)
                };
                return Ok((expr, after));
            } else {
                return Err(format!("expected `,` or `)` in {kind}, found {after:?}"));
            }
        }
    }
    let rest = text
        .strip_prefix('@')
        .ok_or_else(|| format!("expected @tensor, found {text:?}"))?;
    let end = rest.find([',', ')', ' ']).unwrap_or(rest.len());
    if end == 0 {
        return Err("empty tensor name".into());
    }
    Ok((WeightExpr::Tensor(rest[..end].to_string()), &rest[end..]))
}

fn parse_attrs(text: &str) -> Result<Vec<(String, String)>, String> {
    if text.is_empty() {
        return Ok(vec![]);
    }
    let inner = text
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or_else(|| format!("attributes must be {{k=v, ...}}, found {text:?}"))?;
    split_top_level(inner)
        .into_iter()
        .map(|kv| {
            split_once(&kv, "=")
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("attribute {kv:?} needs key=value"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "graph tiny {
  input %v0: i32[T] = token_ids
  input %v1: i32[T] = positions
  input %v2: i32[R] = logit_rows
  const rope_inv_freq = [1.0, 0.1]
  weight %v3: f32[320, 8] = @model.embed_tokens.weight
  weight %v4: f32[8] = @model.norm.weight
  weight %v5: bf16[16, 8] = concat(@a.weight, @b.weight) named @ab.weight
  %v6: f32[T, 8] = embedding(%v3, %v0)
  %v7: f32[T, 8] = rms_norm(%v6, %v4) {eps=1e-5, group=8}
  %v8: f32[T, 16] = matmul(%v7, %v5)
  %v9: f32[T, 4], %v10: f32[T, 12] = split(%v8) {sizes=[4, 12]}
  %v11: f32[T, 4] = rope(%v9, %v1) {n_heads=1, head_dim=4}
  %v12: f32[R, 4] = gather_rows(%v11, %v2)
  output logits = %v12
}
";

    #[test]
    fn print_of_parse_is_identity() {
        let graph = parse(SAMPLE).expect("sample parses");
        assert_eq!(print(&graph), SAMPLE);
    }

    const MOE: &str = "graph moe {
  input %v0: i32[T] = token_ids
  input %v1: i32[R] = logit_rows
  weight %v2: f32[320, 8] = @embed.weight
  weight %v3: f32[3, 8] = @gate.weight
  weight %v4: f32[3] = @bias
  weight %v5: f32[3, 4, 8] = stack(concat(@e0.g, @e0.u), concat(@e1.g, @e1.u), concat(@e2.g, @e2.u)) named @experts.gate_up
  weight %v6: f32[3, 8, 2] = stack(@e0.d, @e1.d, @e2.d) named @experts.down
  weight %v7: f32[8, 8] = deinterleave(@q.weight, 4, 8) named @q.deinterleaved
  %v8: f32[T, 8] = embedding(%v2, %v0)
  %v9: f32[T, 8] = moe(%v8, %v3, %v4, %v5, %v6) {experts=3, top_k=2, routing=softmax, normalize=true, scaling=1.0}
  %v10: f32[T, 8] = matmul(%v9, %v7)
  %v11: f32[R, 8] = gather_rows(%v10, %v1)
  output logits = %v11
}
";

    #[test]
    fn moe_and_stacked_weights_round_trip() {
        let graph = parse(MOE).expect("moe sample parses");
        assert_eq!(print(&graph), MOE);
        let stacked = graph
            .weights()
            .into_iter()
            .find_map(|v| match &graph.value(v).def {
                ValueDef::Weight {
                    expr: WeightExpr::Stack(parts),
                    ..
                } => Some(parts.len()),
                _ => None,
            });
        assert_eq!(stacked, Some(3));
        check_error(
            &MOE.replace("f32[3, 8, 2] = stack", "f32[3, 8, 3] = stack"),
            "moe down must be [3, 8, 2]",
        );
        check_error(&MOE.replace("top_k=2", "top_k=4"), "moe picks 4 of 3");
        check_error(
            &MOE.replace("softmax", "argmax"),
            "softmax, sigmoid or sigmoid_grouped",
        );
    }

    const MLA: &str = "graph mla {
  input %v0: i32[T] = token_ids
  input %v1: i32[T] = positions
  input %v2: i32[R] = logit_rows
  const rope_inv_freq = [1.0, 0.1]
  weight %v3: f32[320, 8] = @embed.weight
  weight %v4: f32[18, 8] = scale_rows(@q.weight, 9, 5, 4, 8, 1.5) named @q.rope_scaled
  weight %v5: f32[10, 8] = @kv_a.weight
  weight %v6: f32[22, 6] = @kv_b.weight
  weight %v7: f32[4, 8] = @router.weight
  weight %v8: f32[4, 6, 8] = stack(@e0, @e1, @e2, @e3) named @experts.gate_up
  weight %v9: f32[4, 8, 3] = stack(@d0, @d1, @d2, @d3) named @experts.down
  %v10: f32[T, 8] = embedding(%v3, %v0)
  %v11: f32[T, 18] = matmul(%v10, %v4)
  %v12: f32[T, 10] = matmul(%v10, %v5)
  %v13: f32[T, 6], %v14: f32[T, 4] = split(%v12) {sizes=[6, 4]}
  %v15: f32[T, 12] = mla_attention(%v11, %v13, %v14, %v6, %v1) {layer=0, n_heads=2, nope_dim=5, rope_dim=4, v_dim=6, kv_lora=6, scale=0.33, rope_interleaved=true}
  %v16: f32[T, 8] = moe(%v10, %v7, %v8, %v9) {experts=4, top_k=2, routing=sigmoid_grouped, normalize=true, scaling=2.5, groups=2, top_groups=1}
  %v17: f32[R, 12] = gather_rows(%v15, %v2)
  output logits = %v17
  output moe = %v16
}
";

    #[test]
    fn mla_attention_and_grouped_routing_round_trip() {
        let graph = parse(MLA).expect("mla sample parses");
        assert_eq!(print(&graph), MLA);
        crate::verify::verify(&graph).expect("verifies");
        check_error(
            &MLA.replace("f32[22, 6] = @kv_b", "f32[24, 6] = @kv_b"),
            "mla kv_b must be [22, 6]",
        );
        check_error(
            &MLA.replace("top_groups=1", "top_groups=3"),
            "the best 3 of 2 groups",
        );
        check_error(
            &MLA.replace("groups=2,", "groups=3,"),
            "do not split 4 experts",
        );
    }

    /// A multi-token-prediction module's pieces: the `hidden` input and a weight that is
    /// columns of a checkpoint tensor.
    const MTP: &str = "graph mtp {
  input %v0: f32[T, 4] = hidden
  weight %v1: f32[4, 4] = columns(@eh_proj.weight, 4, 4, 8) named @eh_proj.hidden.weight
  %v2: f32[T, 4] = matmul(%v0, %v1)
  output mtp_hidden = %v2
}
";

    #[test]
    fn the_hidden_input_and_column_weights_round_trip() {
        let graph = parse(MTP).expect("mtp sample parses");
        assert_eq!(print(&graph), MTP);
        crate::verify::verify(&graph).expect("verifies");
        let hidden = graph
            .input(crate::InputKind::Hidden)
            .expect("the hidden input");
        assert_eq!(graph.ty(hidden).to_string(), "f32[T, 4]");
        check_error(
            &MTP.replace(
                "columns(@eh_proj.weight, 4, 4, 8)",
                "columns(@eh_proj.weight, 4)",
            ),
            "columns(expr, start, len, cols)",
        );
    }

    fn check_error(text: &str, expected: &str) {
        let err = parse(text).expect_err("must not parse");
        assert!(
            err.to_string().contains(expected),
            "error {err} should contain {expected:?}"
        );
    }

    #[test]
    fn bad_text_is_reported_with_its_line() {
        check_error(
            "graph g {\n  %v0: f32[T, 4] = silu(%v9)\n}",
            "line 2: unknown value %v9",
        );
        check_error(
            "graph g {\n  input %v0: q3[T] = token_ids\n}",
            "unknown dtype",
        );
        check_error(
            "graph g {\n  input %v0: i32[T] = token_ids\n  %v1: f32[T, 4] = rms_norm(%v0, %v0) {eps=1e-5, group=4}\n}",
            "rms_norm input must be f32",
        );
        check_error(
            "graph g {\n  input %v0: i32[T] = token_ids\n  %v1: f32[T, 4] = frob(%v0)\n}",
            "unknown op frob",
        );
        check_error(
            "  input %v0: i32[T] = token_ids",
            "expected `graph NAME {` first",
        );
    }
}
