//! NCCL all-reduce across the GPUs of this machine, one rank (thread) per GPU, through the
//! learners' own collective (`NcclCollective::all_reduce_mean`): checks the mean and prints the
//! time and bus bandwidth (2 (W-1)/W x bytes / time, nccl-tests' definition) as a Markdown row.
//!
//! ```sh
//! cargo run --release -p medtvt-learner --example bench_allreduce -- --mib 64 --iters 5
//! ```
//!
//! Without a CUDA device it says so and exits 0 (the CPU machine builds and runs it too).

use anyhow::{bail, Context, Result};
use medtvt_learner::collective::GradientCollective;
use medtvt_learner::nccl_collective::NcclCollective;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let mut mib = 64i64;
    let mut iters = 5usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mib" => mib = value.parse()?,
            "--iters" => iters = value.parse::<usize>()?.max(1),
            other => bail!("unknown flag {other}: --mib N, --iters N"),
        }
    }
    let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    if gpus == 0 {
        println!("| NCCL all-reduce | no CUDA device: skipped | | |");
        return Ok(());
    }
    let id = NcclCollective::new_unique_id()?;
    let numel = mib * (1 << 20) / 4;
    let results: Vec<Result<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..gpus)
            .map(|rank| {
                let id = id.clone();
                scope.spawn(move || -> Result<f64> {
                    let device = Device::Cuda(rank);
                    let mut comm = NcclCollective::connect(rank, gpus, &id, device)?;
                    let data = Tensor::full([numel], rank as f64, (Kind::Float, device));
                    let mut best = f64::INFINITY;
                    for i in 0..=iters {
                        let _ = data.shallow_clone().fill_(rank as f64);
                        tch::Cuda::synchronize(rank as i64);
                        let start = Instant::now();
                        comm.all_reduce_mean(std::slice::from_ref(&data))?;
                        tch::Cuda::synchronize(rank as i64);
                        if i > 0 {
                            best = best.min(start.elapsed().as_secs_f64());
                        }
                    }
                    let want = (gpus - 1) as f64 / 2.0;
                    let err = (data - want).abs().max().double_value(&[]);
                    if err > 1e-5 {
                        bail!("rank {rank}: the mean is off by {err}");
                    }
                    Ok(best)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))).collect()
    });
    let mut slowest = 0f64;
    for r in results {
        slowest = slowest.max(r?);
    }
    let bytes = (numel * 4) as f64;
    let bus = 2.0 * (gpus as f64 - 1.0) / gpus as f64 * bytes / slowest / 1e9;
    println!(
        "| NCCL all-reduce, {gpus} GPU(s), {mib} MiB f32 | {:.2} ms | {bus:.1} GB/s bus | mean correct |",
        slowest * 1e3
    );
    Ok(())
}
