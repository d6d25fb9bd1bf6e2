//! `medtvt doctor`: a plain report of what this machine and build can do, with what to do about
//! each thing that is missing.

use medtvt_learner::nccl::NcclProbe;
use medtvt_model::runtime::TorchRuntime;
use serde::Serialize;
use std::path::Path;

#[derive(clap::Args, Default)]
pub struct DoctorArgs {
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    medtvt_version: &'static str,
    build_profile: &'static str,
    torch: TorchRuntime,
    nccl: NcclProbe,
}

pub fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    let torch = TorchRuntime::probe();
    let lib_dir = torch
        .loaded_from
        .as_deref()
        .and_then(|p| Path::new(p).parent())
        .unwrap_or(Path::new(&torch.built_lib_dir))
        .to_path_buf();
    let report = Report {
        medtvt_version: env!("CARGO_PKG_VERSION"),
        build_profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        nccl: NcclProbe::probe(&lib_dir),
        torch,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn print_text(r: &Report) {
    let t = &r.torch;
    println!("medtvt {} ({} build)", r.medtvt_version, r.build_profile);
    println!("libtorch   built against {} ({})", t.built_against, t.built_lib_dir);
    match (&t.loaded_from, &t.loaded_version) {
        (Some(path), Some(v)) => println!("           loaded {v} from {path}"),
        (Some(path), None) => println!("           loaded from {path} (version file not found beside it)"),
        (None, _) => println!("           could not find libtorch_cpu.so in this process's memory map"),
    }
    println!("           {} intra-op threads, MKL {}", t.intra_op_threads, if t.mkl_available { "yes" } else { "no" });
    if t.cuda_available {
        println!("cuda       yes: {} GPU(s) visible, cuDNN {}", t.cuda_device_count, yes_no(t.cudnn_available));
    } else if !t.cuda_library_loaded {
        println!(
            "cuda       no: libtorch_cuda.so is not loaded (a CPU-only libtorch, or the binary was linked without it)"
        );
    } else if !r.nccl.cuda_driver_loadable {
        println!("cuda       no: libtorch_cuda is loaded but no CUDA driver (libcuda) was found; training runs on CPU");
    } else {
        println!("cuda       no: the CUDA driver loads but no GPU is visible (check CUDA_VISIBLE_DEVICES)");
    }
    println!("nccl       {}", r.nccl.explain());
    println!(
        "collective {}",
        if t.cuda_available && r.nccl.nccl_loadable { "NCCL all-reduce" } else { "CPU all-reduce over TCP" }
    );
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
