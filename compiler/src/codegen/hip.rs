//! Compiles a DCU plan's module with a HIP compiler: the sources of `kernels::cuda`, adapted by
//! `kernels::cuda::hip_module_source`, into one AMD GPU code object (an ELF file for the
//! target's gfx architecture) that fdrt's HIP backend loads with `hipModuleLoadData`.
//!
//! The compiler is an external program, found at compile time: `FD_HIPCC` if set, else `hipcc`
//! on the PATH, else ROCm's `/opt/rocm/bin/hipcc`. Debian's `hipcc` package (clang 15 and the
//! ROCm device libraries) builds for gfx906 on a machine with no GPU. fdc runs it rather than
//! linking a compiler because no HIP compiler ships as a library the way NVRTC does.

use ir::HipArch;
use object::{Object, ObjectSymbol};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

/// Why a module did not compile.
#[derive(Debug, thiserror::Error)]
pub enum HipError {
    #[error(
        "the DCU target needs a HIP compiler, which was not found (tried {tried}): install one \
         (Debian: `apt install hipcc`; ROCm: /opt/rocm/bin/hipcc) or point FD_HIPCC at it"
    )]
    Missing { tried: String },
    #[error("the HIP compiler failed to {step}: {message}")]
    Failed { step: &'static str, message: String },
}

/// The compiled module: the code object and the kernels it defines.
pub struct HipModule {
    pub code_object: Vec<u8>,
    /// Every kernel (`__global__` function) in the code object, sorted.
    pub kernels: Vec<String>,
}

/// The HIP compiler to run, if one is here.
pub fn find_compiler() -> Result<PathBuf, HipError> {
    let mut tried = vec![];
    if let Some(path) = std::env::var_os("FD_HIPCC") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        tried.push(format!("FD_HIPCC={}", path.display()));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        if let Some(found) = std::env::split_paths(&paths)
            .map(|dir| dir.join("hipcc"))
            .find(|p| p.is_file())
        {
            return Ok(found);
        }
    }
    tried.push("hipcc on the PATH".into());
    let rocm = PathBuf::from("/opt/rocm/bin/hipcc");
    if rocm.is_file() {
        return Ok(rocm);
    }
    tried.push(rocm.display().to_string());
    Err(HipError::Missing {
        tried: tried.join(", "),
    })
}

/// For tests that need a HIP compiler: whether one is here. When none is, the test is skipped
/// with a message on the real stderr, unless the environment sets `FD_REQUIRE_HIPCC` (as
/// `scripts/test.sh` does), where a missing compiler is a failure.
pub fn available_for_test(test: &str) -> bool {
    match find_compiler() {
        Ok(_) => true,
        Err(e) if std::env::var_os("FD_REQUIRE_HIPCC").is_some() => panic!("{test}: {e}"),
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {e}");
            false
        }
    }
}

/// ELF machine number of AMD GPU code objects.
const EM_AMDGPU: u16 = 224;

/// Compiles `source` (a whole HIP translation unit) into a code object for `arch`. A process
/// that builds several plans compiles each distinct source once: the HIP compiler takes about
/// 16 s for the module (the plans of one head dimension share it).
pub fn compile(source: &str, arch: HipArch) -> Result<Arc<HipModule>, HipError> {
    static BUILT: super::BuiltModules<HipArch, HipModule> = super::BuiltModules::new();
    BUILT.get_or_build(source, arch, || compile_uncached(source, arch))
}

fn compile_uncached(source: &str, arch: HipArch) -> Result<HipModule, HipError> {
    let compiler = find_compiler()?;
    let failed = |step: &'static str, message: String| HipError::Failed { step, message };
    let dir = tempfile::tempdir().map_err(|e| failed("make a work directory", e.to_string()))?;
    let src = dir.path().join("fdc_module.hip");
    let out = dir.path().join("fdc_module.co");
    std::fs::write(&src, source).map_err(|e| failed("write the source", e.to_string()))?;
    let output = Command::new(&compiler)
        .arg(format!("--offload-arch={}", arch.name()))
        // Device code only, as a plain ELF code object rather than a clang offload bundle.
        .args([
            "--genco",
            "--no-gpu-bundle-output",
            "-O3",
            "-std=c++17",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .output()
        .map_err(|e| failed("start", format!("{}: {e}", compiler.display())))?;
    if !output.status.success() {
        return Err(failed(
            "compile the module",
            format!(
                "{} exited with {}\n{}",
                compiler.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        ));
    }
    let code_object = std::fs::read(&out).map_err(|e| failed("read the output", e.to_string()))?;
    let kernels = kernels_of(&code_object, arch)
        .map_err(|message| failed("produce a code object", message))?;
    Ok(HipModule {
        code_object,
        kernels,
    })
}

/// The kernels a code object for `arch` defines: each has a symbol and a kernel descriptor
/// symbol `NAME.kd`. Errors when the bytes are not an AMD GPU ELF file.
pub fn kernels_of(code_object: &[u8], arch: HipArch) -> Result<Vec<String>, String> {
    let file = object::File::parse(code_object).map_err(|e| format!("not an ELF file: {e}"))?;
    let object::File::Elf64(elf) = &file else {
        return Err("not a 64-bit ELF file".into());
    };
    let machine = elf.elf_header().e_machine.get(elf.endian());
    if machine != EM_AMDGPU {
        return Err(format!(
            "ELF machine {machine}, not an AMD GPU ({EM_AMDGPU}) code object for {}",
            arch.name()
        ));
    }
    let mut kernels: Vec<String> = file
        .symbols()
        .filter_map(|s| s.name().ok()?.strip_suffix(".kd").map(str::to_string))
        .collect();
    kernels.sort();
    kernels.dedup();
    Ok(kernels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::cuda::{hip_module_source, ModuleSpec};

    #[test]
    fn the_module_compiles_for_gfx906_with_every_kernel() {
        if !available_for_test("the_module_compiles_for_gfx906_with_every_kernel") {
            return;
        }
        let module = compile(
            &hip_module_source(&ModuleSpec { head_dim: 64 }),
            HipArch::Gfx906,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&module.code_object[..4], b"\x7fELF");
        for entry in kernels::registry::entries()
            .iter()
            .filter(|e| e.key.target == ir::Target::Dcu(HipArch::Gfx906))
        {
            let folds = kernels::cuda::fold_functions(entry);
            let names = kernels::cuda::functions(entry)
                .iter()
                .chain(folds.iter().flatten());
            for name in names {
                assert!(
                    module.kernels.iter().any(|k| k == name),
                    "{} launches {name}, which the code object lacks",
                    entry.id
                );
            }
        }
    }

    #[test]
    fn a_compile_error_carries_the_compiler_s_log_and_other_files_are_refused() {
        if !available_for_test("a_compile_error_carries_the_compiler_s_log") {
            return;
        }
        let err = compile(
            "extern \"C\" __global__ void k() { undefined_name; }",
            HipArch::Gfx906,
        )
        .err()
        .expect("must fail");
        assert!(err.to_string().contains("undefined_name"), "{err}");
        let not_elf = kernels_of(b"not an elf file at all", HipArch::Gfx906).unwrap_err();
        assert!(not_elf.contains("not an ELF file"), "{not_elf}");
    }
}
