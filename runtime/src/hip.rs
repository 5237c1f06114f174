//! The HIP backend (cargo feature `hip`): what fdrt does with a DCU plan on a machine with the
//! HIP runtime. It loads `libamdhip64` at run time (so fdrt builds and runs where ROCm is
//! absent), finds a device, loads the plan's gfx906 code object with `hipModuleLoadData` and
//! resolves every kernel function the plan's steps launch.
//!
//! Executing the program (the engine: buffers, the KV pool, launches) is not written: it would
//! mirror `crate::cuda::GpuEngine` over HIP's module API, and nothing of it could be run here, as
//! no DCU is available to this project. [`check_plan`] therefore ends with
//! `RuntimeError::DcuPlan` after the checks that can be made; docs/TARGETS.md keeps the account
//! of what was compiled and what never ran.

use crate::{LoadedPlan, RuntimeError};
use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// The names the HIP runtime library goes by (ROCm installs the first; Debian the versioned
/// ones beside it).
const LIBRARY_NAMES: [&str; 3] = ["libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5"];

type HipError = c_int;
type Module = *mut c_void;
type Function = *mut c_void;

/// The functions of the HIP runtime this backend calls, resolved once.
struct Hip {
    init: unsafe extern "C" fn(u32) -> HipError,
    device_count: unsafe extern "C" fn(*mut c_int) -> HipError,
    set_device: unsafe extern "C" fn(c_int) -> HipError,
    module_load_data: unsafe extern "C" fn(*mut Module, *const c_void) -> HipError,
    module_get_function: unsafe extern "C" fn(*mut Function, Module, *const c_char) -> HipError,
    module_unload: unsafe extern "C" fn(Module) -> HipError,
    error_string: unsafe extern "C" fn(HipError) -> *const c_char,
    // Keeps the function pointers above valid.
    _library: libloading::Library,
}

fn failed(message: String) -> RuntimeError {
    RuntimeError::Hip(message)
}

impl Hip {
    /// Loads the HIP runtime library and resolves its functions.
    fn open() -> Result<Hip, RuntimeError> {
        let mut errors = vec![];
        for name in LIBRARY_NAMES {
            // SAFETY: loading the HIP runtime runs its initializers, which have no
            // preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(library) => return Hip::resolve(library),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(failed(format!(
            "the HIP runtime (libamdhip64) was not found: {}; install ROCm or Debian's \
             libamdhip64-5",
            errors.join("; ")
        )))
    }

    fn resolve(library: libloading::Library) -> Result<Hip, RuntimeError> {
        /// A symbol of `library` as a function pointer of the type it is assigned to.
        macro_rules! symbol {
            ($name:literal) => {
                // SAFETY: the type is the HIP runtime API's signature for this symbol.
                *unsafe { library.get($name) }.map_err(|e| {
                    failed(format!(
                        "the HIP runtime lacks {}: {e}",
                        String::from_utf8_lossy($name)
                    ))
                })?
            };
        }
        Ok(Hip {
            init: symbol!(b"hipInit"),
            device_count: symbol!(b"hipGetDeviceCount"),
            set_device: symbol!(b"hipSetDevice"),
            module_load_data: symbol!(b"hipModuleLoadData"),
            module_get_function: symbol!(b"hipModuleGetFunction"),
            module_unload: symbol!(b"hipModuleUnload"),
            error_string: symbol!(b"hipGetErrorString"),
            _library: library,
        })
    }

    /// Initializes HIP and counts its devices: an error when it cannot, or when there is none.
    fn devices(&self) -> Result<usize, RuntimeError> {
        let mut count: c_int = 0;
        // SAFETY: the runtime's documented entry points with a valid out-pointer.
        unsafe {
            self.check(
                "initializing HIP (is there a usable DCU on this machine?)",
                (self.init)(0),
            )?;
            self.check("counting HIP devices", (self.device_count)(&mut count))?;
        }
        if count <= 0 {
            return Err(failed("no HIP device (DCU) on this machine".into()));
        }
        Ok(count as usize)
    }

    /// `Ok` for hipSuccess (0), else the runtime's own words for the error.
    fn check(&self, what: &str, code: HipError) -> Result<(), RuntimeError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: hipGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy();
        Err(failed(format!("{what}: {text} (hipError {code})")))
    }
}

/// What was checked of a DCU plan on this machine's device.
#[derive(Debug)]
pub struct DcuCheck {
    pub devices: usize,
    /// Kernel functions resolved in the loaded code object.
    pub functions: usize,
}

/// Checks a DCU plan against this machine's HIP runtime and device `ordinal`: the code object
/// loads and defines every function the program launches. The clear error of each missing
/// piece (library, device, code object for another architecture, function) comes first; with
/// all present the result is `Ok` with what was checked, and the caller still has no engine to
/// run the plan with.
pub fn check_plan(plan: &LoadedPlan, ordinal: usize) -> Result<DcuCheck, RuntimeError> {
    let ir_types::Target::Dcu(arch) = plan.manifest.target else {
        return Err(failed(format!(
            "plan is for {}, not a DCU",
            plan.manifest.target
        )));
    };
    let object = plan
        .code_symbol(artifacts::code_abi::DCU_CODE_OBJECT)
        .ok_or_else(|| failed("the plan has no DCU code object".into()))?;
    let hip = Hip::open()?;
    let count = hip.devices()?;
    // SAFETY: the runtime's documented entry points with valid out-pointers.
    unsafe {
        if ordinal >= count {
            return Err(failed(format!(
                "device {ordinal} asked for, this machine has {count}"
            )));
        }
        hip.check("selecting the device", (hip.set_device)(ordinal as c_int))?;
        let mut module: Module = std::ptr::null_mut();
        hip.check(
            &format!(
                "loading the plan's code object (built for {}) on device {ordinal}",
                arch.name()
            ),
            (hip.module_load_data)(&mut module, object.as_ptr().cast()),
        )?;
        let mut functions = 0;
        let mut result = Ok(());
        'steps: for step in &plan.program.steps {
            let Some(entry) = kernels::registry::by_name(&step.kernel) else {
                result = Err(failed(format!("unknown kernel {}", step.kernel)));
                break;
            };
            for name in kernels::cuda::functions(entry) {
                let c_name = CString::new(*name).expect("kernel names have no NUL");
                let mut function: Function = std::ptr::null_mut();
                let code = (hip.module_get_function)(&mut function, module, c_name.as_ptr());
                if let Err(e) = hip.check(&format!("finding {name} ({})", step.kernel), code) {
                    result = Err(e);
                    break 'steps;
                }
                functions += 1;
            }
        }
        let _ = (hip.module_unload)(module);
        result.map(|()| DcuCheck {
            devices: count,
            functions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a DCU the check fails with a clear error (no library, or no device)
    /// and never panics; on one with a DCU it would go on to load the code object.
    #[test]
    fn without_a_dcu_the_runtime_check_names_what_is_missing() {
        match Hip::open() {
            Err(e) => assert!(e.to_string().contains("libamdhip64"), "{e}"),
            Ok(hip) => match hip.devices() {
                Ok(count) => eprintln!("a HIP device is present: {count}"),
                Err(e) => {
                    let err = e.to_string();
                    assert!(
                        err.contains("HIP") || err.contains("DCU"),
                        "an error that says what is missing: {err}"
                    );
                }
            },
        }
    }
}
