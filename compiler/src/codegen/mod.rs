//! `codegen` owns ahead-of-time CPU code generation: it turns a fused elementwise kernel
//! ([`KernelSpec`], shapes fixed at compile time) into x86-64 machine code for one [`CpuIsa`],
//! ready to be stored in a plan's code section and called through the types of
//! [`artifacts::code_abi`].
//!
//! Code is generated with cranelift for the `x86_64-unknown-linux-gnu` target regardless of the
//! machine `fdc` runs on, with the ISA extensions of the requested level enabled. The output is a
//! single position-independent function with its constant pool inside its own bytes: anything
//! that would need a loader (relocations, calls, libcalls) is an error, because the runtime maps
//! the bytes as they are. The same spec and ISA always give the same bytes.
//!
//! This module builds the target and checks the result; [`elementwise`] writes the IR.
//! [`cuda`] compiles the CUDA targets' module with NVRTC, [`hip`] the DCU target's with a HIP
//! compiler.

pub mod cuda;
mod elementwise;
pub mod hip;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use ir::CpuIsa;

/// GPU modules already built by this process, by the hash of their source and their
/// architecture. A build takes tens of seconds on two cores and the test suites ask for the same
/// tiny models' module many times, so each is built once; threads asking for a module being
/// built wait for that build rather than starting their own. (Hand-written over std: a map of
/// slots, each locked while its module builds.)
pub(crate) struct BuiltModules<A, M> {
    slots: Mutex<BTreeMap<ModuleKey<A>, ModuleSlot<M>>>,
}

/// A module's source hash (blake3) and architecture.
type ModuleKey<A> = ([u8; 32], A);

/// A module's place: empty until its first build has finished.
type ModuleSlot<M> = Arc<Mutex<Option<Arc<M>>>>;

impl<A: Ord + Copy, M> BuiltModules<A, M> {
    pub(crate) const fn new() -> Self {
        Self {
            slots: Mutex::new(BTreeMap::new()),
        }
    }

    /// The module of `source` for `arch`: built by `build` the first time, the same after.
    /// A build that fails (or panics) leaves its slot empty, so the next call builds again;
    /// threads that were waiting on it then build one after another.
    pub(crate) fn get_or_build<E>(
        &self,
        source: &str,
        arch: A,
        build: impl FnOnce() -> Result<M, E>,
    ) -> Result<Arc<M>, E> {
        let key = (*blake3::hash(source.as_bytes()).as_bytes(), arch);
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone();
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(module) = slot.as_ref() {
            return Ok(module.clone());
        }
        let module = Arc::new(build()?);
        *slot = Some(module.clone());
        Ok(module)
    }
}

/// The only target generated code runs on: the plan's code section is loaded by `fdrt` on
/// x86-64 Linux, whatever machine compiled it.
const TARGET_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Largest column count (or head size) the generator accepts. Offsets inside a row become 32-bit
/// immediates in the code, so rows must stay far below 2 GiB; this bound leaves ample room.
pub const MAX_COLS: usize = 1 << 24;

/// A fused elementwise kernel with its shape baked in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelSpec {
    /// [`artifacts::code_abi::RmsNormFn`]; `group == cols` for a plain norm, the head size for a
    /// per-head norm. `cols` must be a multiple of `group`.
    RmsNorm { cols: usize, group: usize, eps: f32 },
    /// [`artifacts::code_abi::AddRmsNormFn`].
    AddRmsNorm { cols: usize, eps: f32 },
    /// [`artifacts::code_abi::SiluMulFn`]; `cols` is the width of the output (half the input).
    SiluMul { cols: usize },
    /// [`artifacts::code_abi::RopeFn`]; `head_dim` must be even.
    Rope { n_heads: usize, head_dim: usize },
}

impl KernelSpec {
    /// Checks that the shape is one the generated code can handle.
    fn validate(&self) -> Result<(), CodegenError> {
        let invalid = |why: String| Err(CodegenError::InvalidSpec { spec: *self, why });
        match *self {
            KernelSpec::RmsNorm { cols, group, eps } => {
                check_width("cols", cols).or_else(invalid)?;
                if group == 0 || cols % group != 0 {
                    return invalid(format!(
                        "{cols} columns do not split into groups of {group}"
                    ));
                }
                check_eps(eps).or_else(invalid)
            }
            KernelSpec::AddRmsNorm { cols, eps } => {
                check_width("cols", cols).or_else(invalid)?;
                check_eps(eps).or_else(invalid)
            }
            KernelSpec::SiluMul { cols } => {
                // The input row is twice as wide as the output row.
                check_width("2 * cols", cols.saturating_mul(2)).or_else(invalid)
            }
            KernelSpec::Rope { n_heads, head_dim } => {
                if head_dim % 2 != 0 {
                    return invalid(format!("head_dim {head_dim} is odd"));
                }
                check_width("head_dim", head_dim).or_else(invalid)?;
                if n_heads == 0 {
                    return invalid("n_heads is 0".to_owned());
                }
                check_width("n_heads * head_dim", n_heads.saturating_mul(head_dim)).or_else(invalid)
            }
        }
    }

    /// The kernel's name without shape or ISA, as in `rms_norm`.
    fn kind_name(&self) -> &'static str {
        match self {
            KernelSpec::RmsNorm { .. } => "rms_norm",
            KernelSpec::AddRmsNorm { .. } => "add_rms_norm",
            KernelSpec::SiluMul { .. } => "silu_mul",
            KernelSpec::Rope { .. } => "rope",
        }
    }
}

fn check_width(what: &str, width: usize) -> Result<(), String> {
    if width == 0 || width > MAX_COLS {
        return Err(format!("{what} = {width} is outside 1..={MAX_COLS}"));
    }
    Ok(())
}

fn check_eps(eps: f32) -> Result<(), String> {
    // A negative eps could make the root of a zero row NaN; NaN or infinite eps is a broken model.
    if !eps.is_finite() || eps < 0.0 {
        return Err(format!("eps {eps} is not a finite non-negative number"));
    }
    Ok(())
}

/// Machine code for one function: the entry is at offset 0 and the bytes need no relocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedCode {
    pub bytes: Vec<u8>,
}

/// Why no code came out.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// The ISA level has no generated code; the caller falls back to library kernels.
    #[error("no generated code for cpu-{}", .isa.name())]
    Unsupported { isa: CpuIsa },
    #[error("cannot generate {spec:?}: {why}")]
    InvalidSpec { spec: KernelSpec, why: String },
    #[error("cannot set up the {TARGET_TRIPLE} target: {0}")]
    Target(String),
    #[error("cranelift failed on {spec:?}: {message}")]
    Compile { spec: KernelSpec, message: String },
    /// The code would need a loader to fix it up, which the runtime does not have.
    #[error("code for {spec:?} is not self-contained: {what}")]
    NotSelfContained { spec: KernelSpec, what: String },
}

/// Generates the function for `spec` specialized to `isa`.
pub fn generate(spec: &KernelSpec, isa: CpuIsa) -> Result<GeneratedCode, CodegenError> {
    spec.validate()?;
    let target = target_isa(isa)?;
    let function = elementwise::build_function(spec, &*target);
    let mut context = Context::for_function(function);
    let compiled = context
        .compile(&*target, &mut ControlPlane::default())
        .map_err(|error| CodegenError::Compile {
            spec: *spec,
            message: error.inner.to_string(),
        })?;
    let buffer = &compiled.buffer;
    let not_self_contained = |what: String| CodegenError::NotSelfContained { spec: *spec, what };
    if !buffer.relocs().is_empty() {
        return Err(not_self_contained(format!(
            "{} relocation(s)",
            buffer.relocs().len()
        )));
    }
    let calls = buffer.call_sites().count() + buffer.patchable_call_sites().count();
    if calls != 0 {
        return Err(not_self_contained(format!("{calls} call site(s)")));
    }
    Ok(GeneratedCode {
        bytes: compiled.code_buffer().to_vec(),
    })
}

/// The symbol a plan lists the function under, such as `add_rms_norm_576_gen_avx512`,
/// `rms_norm_576_g64_gen_avx2` (a per-head norm) or `rope_9x64_gen_avx2`.
///
/// The name carries the shape but not `eps`: two norms that differ only in `eps` share a name,
/// so code that deduplicates functions compares whole specs, not names.
pub fn symbol_name(spec: &KernelSpec, isa: CpuIsa) -> String {
    let shape = match *spec {
        KernelSpec::RmsNorm { cols, group, .. } if group == cols => cols.to_string(),
        KernelSpec::RmsNorm { cols, group, .. } => format!("{cols}_g{group}"),
        KernelSpec::AddRmsNorm { cols, .. } | KernelSpec::SiluMul { cols } => cols.to_string(),
        KernelSpec::Rope { n_heads, head_dim } => format!("{n_heads}x{head_dim}"),
    };
    format!("{}_{shape}_gen_{}", spec.kind_name(), isa.name())
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            KernelSpec::RmsNorm { cols, group, eps } => {
                write!(f, "rms_norm(cols={cols}, group={group}, eps={eps:e})")
            }
            KernelSpec::AddRmsNorm { cols, eps } => {
                write!(f, "add_rms_norm(cols={cols}, eps={eps:e})")
            }
            KernelSpec::SiluMul { cols } => write!(f, "silu_mul(cols={cols})"),
            KernelSpec::Rope { n_heads, head_dim } => {
                write!(f, "rope(n_heads={n_heads}, head_dim={head_dim})")
            }
        }
    }
}

/// The cranelift ISA for `isa`'s level of x86-64. Portable has no vector extensions to speak of,
/// and the library kernels already cover it, so it is refused.
fn target_isa(isa: CpuIsa) -> Result<OwnedTargetIsa, CodegenError> {
    let extensions: &[&str] = match isa {
        CpuIsa::Portable => return Err(CodegenError::Unsupported { isa }),
        CpuIsa::Avx2 => AVX2_EXTENSIONS,
        CpuIsa::Avx512 => AVX512_EXTENSIONS,
    };
    let target = |what: String| CodegenError::Target(what);
    let mut shared = settings::builder();
    for (name, value) in [("opt_level", "speed"), ("is_pic", "true")] {
        shared
            .set(name, value)
            .map_err(|e| target(format!("{name}={value}: {e}")))?;
    }
    let mut builder = isa::lookup_by_name(TARGET_TRIPLE).map_err(|e| target(e.to_string()))?;
    for extension in extensions {
        builder
            .enable(extension)
            .map_err(|e| target(format!("{extension}: {e}")))?;
    }
    builder
        .finish(settings::Flags::new(shared))
        .map_err(|e| target(e.to_string()))
}

/// Cranelift's x86-64 flags for what `CpuIsa::Avx2` promises. BMI and LZCNT are left off:
/// `CpuIsa::detect` does not check them and integer bit tricks play no part in these kernels.
const AVX2_EXTENSIONS: &[&str] = &[
    "has_sse3",
    "has_ssse3",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
    "has_avx",
    "has_avx2",
    "has_fma",
];

/// `CpuIsa::Avx512` adds AVX-512 F/DQ/VL (cranelift has no separate BW flag; nothing here needs
/// byte/word lanes).
const AVX512_EXTENSIONS: &[&str] = &[
    "has_sse3",
    "has_ssse3",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
    "has_avx",
    "has_avx2",
    "has_fma",
    "has_avx512f",
    "has_avx512dq",
    "has_avx512vl",
];

#[cfg(test)]
mod tests {
    use super::BuiltModules;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A module is built once per source and architecture, also when threads ask for it at
    /// once; a failed build is not kept.
    #[test]
    fn a_module_is_built_once_per_source_and_architecture() {
        static BUILT: BuiltModules<u8, String> = BuiltModules::new();
        let builds = AtomicUsize::new(0);
        let build = |source: &str| {
            builds.fetch_add(1, Ordering::SeqCst);
            // Long enough that the threads below overlap inside it.
            std::thread::sleep(std::time::Duration::from_millis(50));
            Ok::<_, String>(format!("module of {source}"))
        };
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let module = BUILT.get_or_build("a", 1, || build("a")).unwrap();
                    assert_eq!(*module, "module of a");
                });
            }
        });
        assert_eq!(builds.load(Ordering::SeqCst), 1, "four asks, one build");
        BUILT.get_or_build("a", 2, || build("a")).unwrap();
        BUILT.get_or_build("b", 1, || build("b")).unwrap();
        assert_eq!(
            builds.load(Ordering::SeqCst),
            3,
            "another architecture or source builds"
        );

        let failed = BUILT.get_or_build("c", 1, || Err::<String, _>("no compiler".to_string()));
        assert_eq!(failed.unwrap_err(), "no compiler");
        let module = BUILT.get_or_build("c", 1, || build("c")).unwrap();
        assert_eq!(*module, "module of c", "a failed build is tried again");
    }
}
