//! Tidy tests: the architecture's invariants, checked by reading the workspace itself (its
//! sources and `cargo metadata`) rather than by trusting reviewers to remember them.
//!
//! - Every Rust file opens with a `//!` paragraph saying what it is for, and none of those
//!   paragraphs is a left-over FIXME.
//! - Workspace crates depend on each other only in the allowed direction (`ALLOWED_EDGES`).
//! - The runtime is slim: no compiler, no model front ends, no graph library, no code generator
//!   anywhere in its dependency closure.
//! - The crates the runtime links (`runtime`, `kernels`, `artifacts`) never name the graph IR,
//!   and the runtime never names cranelift.
//! - `insta` is a dev-dependency, and only of the crates that keep snapshots.
//!
//! Each failure names every offending file, edge or package, not only the first.

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The crates of the workspace, in dependency order; every `.rs` file under them is checked.
const CRATES: &[&str] = &[
    "ir",
    "models",
    "kernels",
    "artifacts",
    "compiler",
    "runtime",
    "tests",
];

/// Directory names never descended into: build output and local caches.
const SKIPPED_DIRS: &[&str] = &["target", ".cache"];

/// The only workspace-internal normal/build dependency edges allowed, per crate. `tests` may
/// depend on anything; a crate missing from this table may depend on no workspace crate.
const ALLOWED_EDGES: &[(&str, &[&str])] = &[
    ("ir-types", &[]),
    ("ir", &["ir-types"]),
    ("models", &["ir", "ir-types"]),
    ("kernels", &["ir-types"]),
    ("artifacts", &["ir-types"]),
    (
        "compiler",
        &["ir", "ir-types", "models", "kernels", "artifacts"],
    ),
    ("runtime", &["ir-types", "kernels", "artifacts"]),
];

/// Packages that must not be in the runtime's dependency closure; a trailing `*` matches a
/// prefix.
const NOT_IN_RUNTIME: &[&str] = &["cranelift*", "compiler", "models", "ir", "petgraph"];

/// Source trees linked into the runtime, which must not name the graph IR.
const GRAPH_FREE_DIRS: &[&str] = &["runtime/src", "kernels/src", "artifacts/src"];

/// Items of `ir` that are the graph IR (its modules and their re-exports at the crate root);
/// `ir::types` and the vocabulary re-exported from it stay allowed.
const GRAPH_ITEMS: &[&str] = &[
    "graph",
    "op",
    "text",
    "verify",
    "Graph",
    "GraphError",
    "InputKind",
    "NodeId",
    "Op",
    "ValueDef",
    "ValueId",
    "WeightExpr",
];

/// The crates allowed to keep snapshot tests (and so to have `insta` as a dev-dependency).
const INSTA_USERS: &[&str] = &["ir", "compiler", "artifacts", "tests"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn relative(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            if !SKIPPED_DIRS.contains(&name) {
                collect_rs(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `.rs` file of the given workspace-relative directories, sorted.
fn rs_files(dirs: &[&str]) -> Vec<PathBuf> {
    let mut files = vec![];
    for dir in dirs {
        collect_rs(&workspace_root().join(dir), &mut files);
    }
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- doc comments ---------------------------------------------------------------------------

/// Why a file's text breaks the doc-comment rule, if it does.
fn doc_comment_problem(text: &str) -> Option<&'static str> {
    let fixme = concat!("//! ", "FIXME");
    match text.lines().find(|l| !l.trim().is_empty()) {
        None => Some("is empty"),
        Some(first) if !first.starts_with("//!") => Some("does not open with a `//!` doc comment"),
        _ if text.contains(fixme) => Some("has a FIXME in its `//!` doc comment"),
        _ => None,
    }
}

#[test]
fn doc_comment_rule_flags_what_it_should() {
    let fixme = concat!("//! ", "FIXME");
    let cases: &[(String, Option<&str>)] = &[
        ("//! A module.\nfn f() {}\n".into(), None),
        ("\n\n//! After blank lines.\n".into(), None),
        (
            "#![allow(dead_code)]\n//! Too late.\n".into(),
            Some("does not open"),
        ),
        (
            "// A plain comment.\n//! Too late.\n".into(),
            Some("does not open"),
        ),
        (
            "/// An item doc.\nfn f() {}\n".into(),
            Some("does not open"),
        ),
        ("use std::fmt;\n".into(), Some("does not open")),
        ("  \n".into(), Some("is empty")),
        (
            format!("//! A module.\n{fixme}: finish this.\n"),
            Some("FIXME"),
        ),
    ];
    for (text, expected) in cases {
        let got = doc_comment_problem(text);
        match expected {
            None => assert_eq!(got, None, "{text:?}"),
            Some(want) => assert!(
                got.is_some_and(|g| g.contains(want)),
                "{text:?}: got {got:?}, want {want:?}"
            ),
        }
    }
}

#[test]
fn every_rust_file_opens_with_a_doc_comment() {
    let files = rs_files(CRATES);
    assert!(
        files.len() > CRATES.len(),
        "found only {} .rs files; is the walk broken?",
        files.len()
    );
    let offenders: Vec<String> = files
        .iter()
        .filter_map(|f| doc_comment_problem(&read(f)).map(|why| format!("  {} {why}", relative(f))))
        .collect();
    assert!(
        offenders.is_empty(),
        "{} of {} files break the doc-comment rule:\n{}",
        offenders.len(),
        files.len(),
        offenders.join("\n")
    );
}

// ---- cargo metadata -------------------------------------------------------------------------

/// One resolved dependency: the package id it points to, and its kinds (`None` is normal, else
/// `"build"` or `"dev"`).
type ResolvedDep = (String, Vec<Option<String>>);

struct Metadata {
    /// Package id -> package name.
    names: BTreeMap<String, String>,
    /// Workspace members: name -> id.
    members: BTreeMap<String, String>,
    /// Package id -> its dependencies in the resolve graph.
    deps: BTreeMap<String, Vec<ResolvedDep>>,
    /// Workspace member name -> its declared dependencies as (name, kind).
    declared: BTreeMap<String, Vec<(String, Option<String>)>>,
}

fn metadata() -> &'static Metadata {
    static METADATA: OnceLock<Metadata> = OnceLock::new();
    METADATA.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let output = Command::new(&cargo)
            .args(["metadata", "--format-version", "1"])
            .current_dir(workspace_root())
            .output()
            .unwrap_or_else(|e| panic!("running {cargo} metadata: {e}"));
        assert!(
            output.status.success(),
            "cargo metadata failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: Value =
            serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
        parse_metadata(&json)
    })
}

fn parse_metadata(json: &Value) -> Metadata {
    let text = |v: &Value| v.as_str().expect("a string").to_string();
    let kind = |v: &Value| v.as_str().map(str::to_string);
    let mut names = BTreeMap::new();
    let mut declared = BTreeMap::new();
    let member_ids: BTreeSet<String> = json["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(text)
        .collect();
    for package in json["packages"].as_array().expect("packages") {
        let (id, name) = (text(&package["id"]), text(&package["name"]));
        if member_ids.contains(&id) {
            let deps = package["dependencies"].as_array().expect("dependencies");
            let deps = deps
                .iter()
                .map(|d| (text(&d["name"]), kind(&d["kind"])))
                .collect::<Vec<_>>();
            declared.insert(name.clone(), deps);
        }
        names.insert(id, name);
    }
    let members = member_ids
        .iter()
        .map(|id| (names[id].clone(), id.clone()))
        .collect();
    let mut deps = BTreeMap::new();
    for node in json["resolve"]["nodes"].as_array().expect("resolve.nodes") {
        let edges = node["deps"]
            .as_array()
            .expect("deps")
            .iter()
            .map(|d| {
                let kinds = d["dep_kinds"]
                    .as_array()
                    .expect("dep_kinds")
                    .iter()
                    .map(|k| kind(&k["kind"]))
                    .collect();
                (text(&d["pkg"]), kinds)
            })
            .collect();
        deps.insert(text(&node["id"]), edges);
    }
    Metadata {
        names,
        members,
        deps,
        declared,
    }
}

/// Whether a dependency edge is linked into the dependent (normal) or runs for it (build).
fn is_normal_or_build(kinds: &[Option<String>]) -> bool {
    kinds.iter().any(|k| k.as_deref() != Some("dev"))
}

impl Metadata {
    /// Normal and build dependencies of `id` (not dev), as package ids.
    fn linked_deps(&self, id: &str) -> impl Iterator<Item = &str> {
        self.deps[id]
            .iter()
            .filter(|(_, kinds)| is_normal_or_build(kinds))
            .map(|(dep, _)| dep.as_str())
    }

    /// Every package `name` depends on through normal and build edges: package name -> the
    /// chain of package names that pulls it in (a shortest one, starting with `name`).
    fn closure(&self, name: &str) -> BTreeMap<String, Vec<String>> {
        let start = self.members[name].clone();
        let mut chains: BTreeMap<String, Vec<String>> =
            BTreeMap::from([(start.clone(), vec![name.to_string()])]);
        let mut queue = VecDeque::from([start.clone()]);
        while let Some(id) = queue.pop_front() {
            let chain = chains[&id].clone();
            for dep in self.linked_deps(&id) {
                if !chains.contains_key(dep) {
                    let mut longer = chain.clone();
                    longer.push(self.names[dep].clone());
                    chains.insert(dep.to_string(), longer);
                    queue.push_back(dep.to_string());
                }
            }
        }
        chains.remove(&start);
        chains
            .into_iter()
            .map(|(id, chain)| (self.names[&id].clone(), chain))
            .collect()
    }
}

/// Workspace edges (normal or build) outside `ALLOWED_EDGES`, as `from -> to`.
fn bad_workspace_edges(meta: &Metadata) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED_EDGES.iter().copied().collect();
    let mut bad = vec![];
    for (name, id) in &meta.members {
        if name == "tests" {
            continue;
        }
        for dep in meta.linked_deps(id) {
            let dep_name = &meta.names[dep];
            let is_member = meta.members.get(dep_name).is_some_and(|m| m == dep);
            let ok = allowed
                .get(name.as_str())
                .is_some_and(|ok| ok.contains(&dep_name.as_str()));
            if is_member && !ok {
                bad.push(format!("{name} -> {dep_name}"));
            }
        }
    }
    bad
}

fn matches_pattern(name: &str, pattern: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// The chains that pull a package of `NOT_IN_RUNTIME` into the runtime's closure.
fn banned_in_runtime(closure: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    closure
        .iter()
        .filter(|(name, _)| NOT_IN_RUNTIME.iter().any(|p| matches_pattern(name, p)))
        .map(|(_, chain)| chain.join(" -> "))
        .collect()
}

/// Workspace crates that depend on `insta` other than as a dev-dependency of `INSTA_USERS`.
fn insta_misuses(meta: &Metadata) -> Vec<String> {
    let mut bad = vec![];
    for (crate_name, deps) in &meta.declared {
        for (_, kind) in deps.iter().filter(|(dep, _)| dep == "insta") {
            match kind.as_deref() {
                Some("dev") if INSTA_USERS.contains(&crate_name.as_str()) => {}
                Some("dev") => bad.push(format!("{crate_name} (dev)")),
                other => bad.push(format!("{crate_name} ({})", other.unwrap_or("normal"))),
            }
        }
    }
    bad
}

/// A made-up workspace that breaks every dependency rule once, in `cargo metadata`'s shape.
fn broken_metadata() -> Metadata {
    let id = |name: &str| format!("path+file:///ws/{name}#0.1.0");
    let dep = |name: &str, kind: Option<&str>| json!({"name": name, "pkg": id(name), "dep_kinds": [{"kind": kind, "target": null}]});
    let declared = |name: &str, kind: Option<&str>| json!({"name": name, "kind": kind});
    let package =
        |name: &str, deps: Vec<Value>| json!({"id": id(name), "name": name, "dependencies": deps});
    let node = |name: &str, deps: Vec<Value>| json!({"id": id(name), "deps": deps});
    let json = json!({
        "workspace_members": [id("ir"), id("kernels"), id("compiler"), id("runtime"), id("tests")],
        "packages": [
            package("ir", vec![declared("petgraph", None)]),
            package("kernels", vec![declared("ir", None), declared("insta", Some("dev"))]),
            package("compiler", vec![declared("ir", None), declared("cranelift-codegen", None)]),
            package("runtime", vec![declared("ir", None), declared("compiler", None), declared("insta", None)]),
            package("tests", vec![declared("runtime", Some("dev")), declared("insta", Some("dev"))]),
            package("petgraph", vec![]),
            package("cranelift-codegen", vec![]),
            package("insta", vec![]),
        ],
        "resolve": {"nodes": [
            node("ir", vec![dep("petgraph", None)]),
            node("kernels", vec![dep("ir", None), dep("runtime", Some("dev")), dep("insta", Some("dev"))]),
            node("compiler", vec![dep("ir", None), dep("cranelift-codegen", None)]),
            node("runtime", vec![dep("ir", None), dep("compiler", Some("build")), dep("insta", None)]),
            node("tests", vec![dep("runtime", Some("dev")), dep("compiler", None), dep("insta", Some("dev"))]),
            node("petgraph", vec![]),
            node("cranelift-codegen", vec![]),
            node("insta", vec![]),
        ]},
    });
    parse_metadata(&json)
}

#[test]
fn dependency_rules_flag_what_they_should() {
    let meta = broken_metadata();
    // kernels -> runtime is a dev edge and tests may depend on anything: neither is flagged.
    // kernels and runtime must use ir-types, not the graph crate ir.
    assert_eq!(
        bad_workspace_edges(&meta),
        ["kernels -> ir", "runtime -> ir", "runtime -> compiler"]
    );
    assert_eq!(
        banned_in_runtime(&meta.closure("runtime")),
        [
            "runtime -> compiler",
            "runtime -> compiler -> cranelift-codegen",
            "runtime -> ir",
            "runtime -> ir -> petgraph"
        ]
    );
    assert_eq!(insta_misuses(&meta), ["kernels (dev)", "runtime (normal)"]);
}

#[test]
fn workspace_crates_depend_only_downwards() {
    let meta = metadata();
    for &name in CRATES {
        assert!(
            meta.members.contains_key(name),
            "{name} is not a workspace member any more; update tidy.rs"
        );
    }
    let bad = bad_workspace_edges(meta);
    assert!(
        bad.is_empty(),
        "workspace dependency edges outside ALLOWED_EDGES:\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn the_runtime_closure_is_slim() {
    let closure = metadata().closure("runtime");
    println!(
        "runtime's normal/build dependency closure: {} packages",
        closure.len()
    );
    for required in ["ir-types", "kernels", "artifacts"] {
        assert!(
            closure.contains_key(required),
            "runtime's closure lacks {required}; is the walk broken?"
        );
    }
    let bad = banned_in_runtime(&closure);
    assert!(
        bad.is_empty(),
        "the runtime's dependency closure contains banned packages ({NOT_IN_RUNTIME:?}):\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn insta_is_a_dev_dependency_of_snapshot_crates_only() {
    let bad = insta_misuses(metadata());
    assert!(
        bad.is_empty(),
        "insta may only be a dev-dependency of {INSTA_USERS:?}; found in:\n  {}",
        bad.join("\n  ")
    );
}

// ---- source greps ---------------------------------------------------------------------------

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `text` contains `word` not glued to identifier characters on either side.
fn mentions(text: &str, word: &str, case_insensitive: bool) -> bool {
    let (hay, needle) = if case_insensitive {
        (text.to_ascii_lowercase(), word.to_ascii_lowercase())
    } else {
        (text.to_string(), word.to_string())
    };
    hay.match_indices(&needle).any(|(at, _)| {
        let before = hay[..at].chars().next_back();
        let after = hay[at + needle.len()..].chars().next();
        !before.is_some_and(is_ident_char) && !after.is_some_and(is_ident_char)
    })
}

/// The graph-IR items a source text names: `ir::Graph`-style paths and items inside
/// `ir::{...}` groups (`use ir::{DType, graph::NodeId}` names `graph`).
fn graph_items_named(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for item in GRAPH_ITEMS {
        if mentions(text, &format!("ir::{item}"), false) {
            found.insert(format!("ir::{item}"));
        }
    }
    for (at, _) in text.match_indices("ir::{") {
        if text[..at].chars().next_back().is_some_and(is_ident_char) {
            continue;
        }
        let body = &text[at + "ir::{".len()..];
        let mut depth = 0;
        let end = body
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => return true,
                    '}' => depth -= 1,
                    _ => {}
                }
                false
            })
            .map_or(body.len(), |(i, _)| i);
        for part in top_level_items(&body[..end]) {
            let head = part
                .split("::")
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .unwrap_or_default();
            if GRAPH_ITEMS.contains(&head) {
                found.insert(format!("ir::{{{head}}}"));
            }
        }
    }
    found
}

/// Splits a use-group body on its top-level commas.
fn top_level_items(body: &str) -> Vec<&str> {
    let mut parts = vec![];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(body[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(body[start..].trim());
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// Everything graph-related a file of a graph-free crate names.
fn graph_mentions(text: &str) -> Vec<String> {
    let mut found: Vec<String> = graph_items_named(text).into_iter().collect();
    if mentions(text, "petgraph", true) {
        found.push("petgraph".into());
    }
    found
}

#[test]
fn graph_mentions_are_recognized() {
    let cases: &[(&str, &[&str])] = &[
        ("use ir::{CpuIsa, DType, OpKind, QuantScheme, Target};", &[]),
        ("use ir::types::{DType, OpKind};\nuse ir::CpuIsa;", &[]),
        ("fn f(op: ir::OpKind, s: ir::Shape) {}", &[]),
        ("let dir = fdir::graph();", &[]),
        ("use ir::graph::Graph;", &["ir::graph"]),
        ("fn f(g: &ir::Graph) {}", &["ir::Graph"]),
        ("match op { ir::Op::MatMul => {} }", &["ir::Op"]),
        ("let t = ir::text::print(&g);", &["ir::text"]),
        ("ir::verify::verify(&g)?;", &["ir::verify"]),
        ("use ir::op::Op;", &["ir::op"]),
        ("use ir::{DType, Graph};", &["ir::{Graph}"]),
        (
            "use ir::{\n    CpuIsa,\n    graph::{NodeId, ValueId},\n};",
            &["ir::{graph}"],
        ),
        (
            "use ir::{types::{DType, Target}, ValueId};",
            &["ir::{ValueId}"],
        ),
        ("// built on Petgraph's StableGraph", &["petgraph"]),
        ("use petgraph::Direction;", &["petgraph"]),
    ];
    for (text, expected) in cases {
        let got = graph_mentions(text);
        assert_eq!(got, *expected, "{text:?}");
    }
}

#[test]
fn runtime_kernels_and_artifacts_never_name_the_graph_ir() {
    let files = rs_files(GRAPH_FREE_DIRS);
    assert!(
        !files.is_empty(),
        "no sources found under {GRAPH_FREE_DIRS:?}"
    );
    let offenders: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let found = graph_mentions(&read(f));
            (!found.is_empty()).then(|| format!("  {}: {}", relative(f), found.join(", ")))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "graph-IR names in crates the runtime links:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_runtime_never_names_cranelift() {
    let offenders: Vec<String> = rs_files(&["runtime/src"])
        .iter()
        .filter(|f| read(f).to_ascii_lowercase().contains("cranelift"))
        .map(|f| format!("  {}", relative(f)))
        .collect();
    assert!(
        offenders.is_empty(),
        "runtime sources mentioning cranelift:\n{}",
        offenders.join("\n")
    );
}
