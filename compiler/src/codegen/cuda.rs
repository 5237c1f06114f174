//! Compiles a plan's CUDA module with NVRTC: the sources of `kernels::cuda`, specialized to the
//! plan, into a cubin for the target architecture and PTX for its virtual one (kept in the plan
//! for the record and for tools; fdrt loads the cubin).
//!
//! NVRTC is loaded at run time (the `nvidia-cuda-nvrtc` wheel's `libnvrtc.so.13`, found through
//! `LD_LIBRARY_PATH`), so fdc builds and runs without it until a CUDA target is asked for.
//! cudarc's safe wrapper returns PTX only, so the cubin is read through its raw bindings.

use cudarc::nvrtc::{result, sys};
use ir::CudaArch;
use std::ffi::{CStr, CString};
use std::sync::Arc;

/// The compiled module.
pub struct CudaModule {
    pub cubin: Vec<u8>,
    pub ptx: Vec<u8>,
}

/// Why a module did not compile.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error(
        "the CUDA targets need NVRTC, which was not found: install it with \
         `pip install \"nvidia-cuda-nvrtc==13.0.*\"` and add its `nvidia/cu13/lib` folder to \
         LD_LIBRARY_PATH"
    )]
    Missing,
    #[error("NVRTC failed to {step}: {message}")]
    Failed { step: &'static str, message: String },
}

/// Whether NVRTC can be loaded here.
pub fn available() -> bool {
    // SAFETY: only tries to open the library, by its known names.
    unsafe { sys::is_culib_present() }
}

/// For tests that need NVRTC: whether it is here. When it is not, the test is skipped with a
/// message on the real stderr (which the test harness does not capture), unless the environment
/// sets `FD_REQUIRE_NVRTC` (as `scripts/test.sh` does), where a missing NVRTC is a failure.
pub fn available_for_test(test: &str) -> bool {
    if available() {
        return true;
    }
    if std::env::var_os("FD_REQUIRE_NVRTC").is_some() {
        panic!("{test}: {}", NvrtcError::Missing);
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: NVRTC not found");
    false
}

/// Compiles `source` into a cubin for `arch` and PTX for its virtual architecture (once per
/// process for a given source and architecture: [`super::BuiltModules`]).
///
/// One NVRTC compile for the real architecture gives both: the PTX NVRTC keeps from it is the
/// text a compile for the virtual architecture gives, byte for byte (checked for the module on
/// sm80 and sm90 with NVRTC 13.0), so a second compile would only cost time (a third or more of
/// the total).
pub fn compile(source: &str, arch: CudaArch) -> Result<Arc<CudaModule>, NvrtcError> {
    static BUILT: super::BuiltModules<CudaArch, CudaModule> = super::BuiltModules::new();
    if !available() {
        return Err(NvrtcError::Missing);
    }
    let (major, minor) = arch.compute_capability();
    BUILT.get_or_build(source, arch, || {
        run(source, &format!("--gpu-architecture=sm_{major}{minor}"))
    })
}

/// NVRTC's "how large is the output" and "copy the output" calls for one kind of output.
type SizeFn = unsafe fn(sys::nvrtcProgram, *mut usize) -> sys::nvrtcResult;
type ReadFn = unsafe fn(sys::nvrtcProgram, *mut std::ffi::c_char) -> sys::nvrtcResult;

fn run(source: &str, arch_option: &str) -> Result<CudaModule, NvrtcError> {
    let failed = |step: &'static str, message: String| NvrtcError::Failed { step, message };
    let src = CString::new(source).map_err(|e| failed("read the source", e.to_string()))?;
    let name = CString::new("fdc_module.cu").expect("no NUL in a literal");
    let program = result::create_program(&src, Some(&name))
        .map_err(|e| failed("create the program", format!("{e:?}")))?;
    // Destroys the program on every path out.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: created above and destroyed once; an error here leaks only the program.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let program = Program(program);
    let options = [
        arch_option.to_string(),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    // SAFETY: a live program and owned option strings.
    if let Err(e) = unsafe { result::compile_program(program.0, &options) } {
        // SAFETY: the program is live; the log is a NUL-terminated string NVRTC wrote.
        let log = unsafe { result::get_program_log(program.0) }
            .map(|log| {
                unsafe { CStr::from_ptr(log.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        return Err(failed("compile the module", format!("{e:?}\n{log}")));
    }
    let read = |size_of: SizeFn, get: ReadFn| {
        let mut size = 0usize;
        // SAFETY: a compiled program; the buffer is sized from NVRTC's own answer.
        unsafe {
            size_of(program.0, &mut size)
                .result()
                .map_err(|e| failed("size the output", format!("{e:?}")))?;
            let mut bytes = vec![0u8; size];
            get(program.0, bytes.as_mut_ptr() as *mut std::ffi::c_char)
                .result()
                .map_err(|e| failed("read the output", format!("{e:?}")))?;
            Ok(bytes)
        }
    };
    Ok(CudaModule {
        cubin: read(sys::nvrtcGetCUBINSize, sys::nvrtcGetCUBIN)?,
        ptx: read(sys::nvrtcGetPTXSize, sys::nvrtcGetPTX)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::cuda::{module_source, ModuleSpec};

    #[test]
    fn the_module_compiles_for_every_architecture() {
        if !available_for_test("the_module_compiles_for_every_architecture") {
            return;
        }
        let source = module_source(&ModuleSpec { head_dim: 64 });
        for arch in CudaArch::ALL {
            let module = compile(&source, arch).unwrap_or_else(|e| panic!("{arch:?}: {e}"));
            // A cubin is an ELF file; the PTX names its target and every kernel.
            assert_eq!(&module.cubin[..4], b"\x7fELF", "{arch:?}");
            let ptx = String::from_utf8_lossy(&module.ptx);
            let (major, minor) = arch.compute_capability();
            assert!(
                ptx.contains(&format!(".target sm_{major}{minor}")),
                "{arch:?}"
            );
            for name in [
                "matmul_bf16",
                "attention_partial_f32",
                "kv_append_f32",
                "rope_f32",
            ] {
                assert!(ptx.contains(&format!(".entry {name}(")), "{arch:?} {name}");
            }
        }
    }

    #[test]
    fn a_compile_error_carries_nvrtc_s_log() {
        if !available_for_test("a_compile_error_carries_nvrtc_s_log") {
            return;
        }
        let err = compile(
            "extern \"C\" __global__ void k() { undefined_name; }",
            CudaArch::Sm90,
        )
        .err()
        .expect("must fail");
        assert!(err.to_string().contains("undefined_name"), "{err}");
    }
}
