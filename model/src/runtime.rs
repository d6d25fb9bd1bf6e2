//! Facts about the libtorch this process runs on: its version, where it was loaded from, and
//! which devices and back-ends it can use. Used by `medtvt doctor` and for device selection.

use serde::Serialize;

/// What the linked libtorch offers in this process.
#[derive(Debug, Clone, Serialize)]
pub struct TorchRuntime {
    /// Version of the libtorch the binary was built against (from torch/version.py at build time).
    pub built_against: String,
    /// Directory the binary was linked against (its rpath).
    pub built_lib_dir: String,
    /// Path of the libtorch_cpu.so actually mapped into this process, if found.
    pub loaded_from: Option<String>,
    /// Version read next to the loaded library (torch/version.py), if present.
    pub loaded_version: Option<String>,
    /// Whether libtorch_cuda.so is mapped into the process (the --no-as-needed link fix worked).
    pub cuda_library_loaded: bool,
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cudnn_available: bool,
    pub mkl_available: bool,
    pub intra_op_threads: i32,
}

impl TorchRuntime {
    /// Probe the running process. Cheap; initialises libtorch if it was not yet.
    pub fn probe() -> Self {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let cuda_available = tch::Cuda::is_available();
        let loaded_from = find_mapped(&maps, "libtorch_cpu.so");
        let loaded_version = loaded_from.as_deref().and_then(version_next_to);
        TorchRuntime {
            built_against: env!("MEDTVT_LIBTORCH_BUILD_VERSION").to_string(),
            built_lib_dir: env!("MEDTVT_LIBTORCH_BUILD_LIB").to_string(),
            loaded_from,
            loaded_version,
            cuda_library_loaded: find_mapped(&maps, "libtorch_cuda.so").is_some(),
            cuda_available,
            cuda_device_count: if cuda_available { tch::Cuda::device_count() } else { 0 },
            cudnn_available: tch::Cuda::cudnn_is_available(),
            mkl_available: tch::utils::has_mkl(),
            intra_op_threads: tch::get_num_threads(),
        }
    }
}

/// The first path in /proc/self/maps whose file name starts with `lib_name`.
fn find_mapped(maps: &str, lib_name: &str) -> Option<String> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            std::path::Path::new(path).file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with(lib_name))
        })
        .map(str::to_string)
}

/// Reads `__version__` from torch/version.py, two levels above torch/lib/libtorch_cpu.so.
fn version_next_to(lib_path: &str) -> Option<String> {
    let torch_dir = std::path::Path::new(lib_path).parent()?.parent()?;
    let text = std::fs::read_to_string(torch_dir.join("version.py")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim().trim_matches(['\'', '"']).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mapped_library_by_file_name() {
        let maps = "7f00-7f01 r-xp 0 08:01 1 /opt/torch/lib/libtorch_cpu.so\n\
                    7f02-7f03 r-xp 0 08:01 2 /usr/lib/libc.so.6\n";
        assert_eq!(find_mapped(maps, "libtorch_cpu.so").as_deref(), Some("/opt/torch/lib/libtorch_cpu.so"));
        assert_eq!(find_mapped(maps, "libtorch_cuda.so"), None);
    }

    #[test]
    fn probe_sees_the_linked_libtorch() {
        let rt = TorchRuntime::probe();
        let loaded = rt.loaded_from.expect("libtorch_cpu.so must be mapped in a tch test binary");
        assert!(loaded.contains("libtorch_cpu.so"));
        assert!(rt.intra_op_threads >= 1);
    }
}
