//! Generates the Rust types and the tonic client/server of `medtvt/v1/coordinator.proto`.
//! protoc comes from the vendored binary (no system install) unless PROTOC is already set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let proto = "medtvt/v1/coordinator.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        // bytes fields as `Bytes`: weight chunks and samples are sliced and shared, never copied.
        .bytes(".")
        .compile_protos(&[proto], &["."])?;
    Ok(())
}
