//! Whether NCCL (through cudarc's dynamic loader) can be used in this process, and if not, why.
//!
//! cudarc looks for `libnccl.so` (and a few versioned names) on the dynamic loader's path, but the
//! PyPI wheel `nvidia-nccl-cu13` ships only `libnccl.so.2`; the probe detects that case and says
//! how to fix it instead of letting cudarc panic later.

use serde::Serialize;
use std::path::{Path, PathBuf};

/// Result of probing for the CUDA driver and NCCL.
#[derive(Debug, Clone, Serialize)]
pub struct NcclProbe {
    /// libcuda could be loaded (a GPU driver is installed).
    pub cuda_driver_loadable: bool,
    /// cudarc can load libnccl under one of the names it knows.
    pub nccl_loadable: bool,
    /// A libnccl.so.2 found next to the linked libtorch (the pip wheel's copy), if any.
    pub wheel_library: Option<PathBuf>,
}

impl NcclProbe {
    /// Probe the dynamic loader. Never panics, even without any CUDA library installed.
    pub fn probe(libtorch_lib_dir: &Path) -> Self {
        // SAFETY: these only try dlopen on a list of names and close what they opened.
        let cuda_driver_loadable = unsafe { cudarc::driver::sys::is_culib_present() };
        let nccl_loadable = unsafe { cudarc::nccl::sys::is_culib_present() };
        NcclProbe { cuda_driver_loadable, nccl_loadable, wheel_library: wheel_nccl(libtorch_lib_dir) }
    }

    /// A one-line human explanation of the state, with the fix when something is missing.
    pub fn explain(&self) -> String {
        match (self.nccl_loadable, &self.wheel_library) {
            (true, _) => "libnccl loads; NCCL all-reduce is available".to_string(),
            (false, Some(lib)) => format!(
                "libnccl not on the loader path, but the torch wheel ships {}: make a folder with a link \
                 libnccl.so -> that file and add it to LD_LIBRARY_PATH (learners fall back to the CPU collective until then)",
                lib.display()
            ),
            (false, None) => "libnccl not found: learners use the CPU collective (install NCCL for GPU all-reduce)".to_string(),
        }
    }
}

/// `site-packages/nvidia/nccl/lib/libnccl.so.2`, reached from `site-packages/torch/lib`.
fn wheel_nccl(libtorch_lib_dir: &Path) -> Option<PathBuf> {
    let site_packages = libtorch_lib_dir.parent()?.parent()?;
    let lib = site_packages.join("nvidia/nccl/lib/libnccl.so.2");
    lib.exists().then_some(lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_wheel_library_from_the_torch_lib_dir() {
        let root = std::env::temp_dir().join(format!("nccl-probe-{}", std::process::id()));
        let nccl_dir = root.join("nvidia/nccl/lib");
        std::fs::create_dir_all(&nccl_dir).unwrap();
        std::fs::create_dir_all(root.join("torch/lib")).unwrap();
        std::fs::write(nccl_dir.join("libnccl.so.2"), b"").unwrap();
        assert_eq!(wheel_nccl(&root.join("torch/lib")), Some(nccl_dir.join("libnccl.so.2")));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(wheel_nccl(&root.join("torch/lib")), None);
    }

    #[test]
    fn probing_without_cuda_does_not_panic_and_explains() {
        let probe = NcclProbe::probe(Path::new("/nonexistent/torch/lib"));
        assert!(!probe.explain().is_empty());
    }
}
