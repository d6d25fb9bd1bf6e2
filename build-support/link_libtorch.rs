//! Build script shared by every crate whose binaries or tests link libtorch.
//!
//! torch-sys leaves two gaps that we close here (see ../shared/docs/toolchain.md):
//! 1. rustc links with `--as-needed`, which drops libtorch_cuda.so because no symbol of it is
//!    referenced directly; CUDA would then silently be unavailable on a GPU machine. We force it
//!    in with `--no-as-needed` when the library exists.
//! 2. torch-sys puts no rpath on the final binary; we add the libtorch lib directory so binaries
//!    and test executables run without LD_LIBRARY_PATH on the machine that built them.
//!
//! The libtorch lib directory comes from torch-sys (`links = "tch"`), which exports it as
//! DEP_TCH_LIBTORCH_LIB to crates that depend on torch-sys directly.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB unset: add torch-sys as a direct dependency");
        return;
    };
    let lib_dir = Path::new(&lib);
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // The version of the libtorch we built against, for `medtvt doctor`.
    let version = lib_dir
        .parent()
        .map(|torch| torch.join("version.py"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| {
            text.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_string()))
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=MEDTVT_LIBTORCH_BUILD_VERSION={version}");
    println!("cargo:rustc-env=MEDTVT_LIBTORCH_BUILD_LIB={}", lib_dir.display());
}
