//! [`GradientCollective`] over NCCL for CUDA learners (one GPU per rank), through cudarc's
//! dynamically loaded libnccl. Rank 0 creates the NCCL unique id; the job runner shares it with
//! the other ranks through the coordinator's Rendezvous, and every rank joins the communicator.
//!
//! Each operation packs the tensors into one contiguous f32 CUDA buffer, waits for libtorch's
//! queued work, runs the NCCL collective in place on the legacy default stream, waits for it and
//! copies the result back. NCCL's ring all-reduce hands every rank the same reduced bytes, so the
//! ranks' weights stay identical as with the TCP collective.
//!
//! No operation waits forever: after launching a collective, the rank polls the stream and NCCL's
//! asynchronous error state (ncclCommGetAsyncError) instead of blocking in a synchronize; an
//! asynchronous error, or `cluster.collective_timeout_s` passing (a peer died or hangs), aborts
//! the communicator (ncclCommAbort, which also unblocks the kernels waiting on the lost peer) and
//! fails the operation, so the learner can re-form its group with a new communicator.
//!
//! Not exercised by the test suite: the build machine has no GPU. `medtvt doctor` says whether
//! libnccl loads; the job runner falls back to the TCP collective when it does not.

use crate::collective::{CollectiveError, GradientCollective};
use cudarc::driver::sys as cuda;
use cudarc::nccl::{result, sys};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The bytes of an NCCL unique id (what rank 0 shares through Rendezvous).
pub const NCCL_ID_BYTES: usize = 128;

pub struct NcclCollective {
    comm: sys::ncclComm_t,
    rank: usize,
    world_size: usize,
    device_index: usize,
    /// How long one operation may take before the communicator is aborted.
    op_timeout: Option<Duration>,
    /// Aborted (after an error or a timeout): unusable, and not to be destroyed again.
    aborted: bool,
}

// SAFETY: the communicator is used from one thread at a time (the trait takes &mut self), which
// is all NCCL requires of a communicator.
unsafe impl Send for NcclCollective {}

fn nccl_error(rank: usize, what: &str, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Io { rank, source: std::io::Error::other(format!("NCCL {what}: {e:?}")) }
}

impl NcclCollective {
    /// A fresh unique id (rank 0 only).
    pub fn new_unique_id() -> Result<Vec<u8>, CollectiveError> {
        let id = result::get_uniqueid().map_err(|e| nccl_error(0, "get unique id", e))?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    /// Joins the communicator of `world_size` ranks named by `unique_id`, on CUDA device `device`.
    pub fn connect(rank: usize, world_size: usize, unique_id: &[u8], device: Device) -> Result<Self, CollectiveError> {
        let Device::Cuda(device_index) = device else {
            return Err(nccl_error(rank, "set-up", "the NCCL collective needs a CUDA device"));
        };
        if unique_id.len() != NCCL_ID_BYTES {
            return Err(nccl_error(
                rank,
                "set-up",
                format!("unique id has {} bytes, expected {NCCL_ID_BYTES}", unique_id.len()),
            ));
        }
        let mut internal = [0 as ::core::ffi::c_char; NCCL_ID_BYTES];
        for (dst, &src) in internal.iter_mut().zip(unique_id) {
            *dst = src as ::core::ffi::c_char;
        }
        let id = sys::ncclUniqueId { internal };
        // NCCL binds the communicator to the current CUDA device: make libtorch's device current.
        let _ = Tensor::zeros([1], (Kind::Float, device));
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id came from ncclGetUniqueId on rank 0.
        unsafe { result::comm_init_rank(&mut comm, world_size as i32, id, rank as i32) }
            .map_err(|e| nccl_error(rank, "init", e))?;
        Ok(NcclCollective { comm, rank, world_size, device_index, op_timeout: None, aborted: false })
    }

    /// Aborts the communicator when an operation takes longer than `timeout`.
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = Some(timeout);
        self
    }

    /// Waits for the collective just launched on the legacy default stream, polling the stream and
    /// NCCL's asynchronous error; aborts the communicator on an error or after the timeout.
    fn wait_for_collective(&mut self, what: &str) -> Result<(), CollectiveError> {
        let started = Instant::now();
        loop {
            // SAFETY: the null stream is the legacy default stream of the current context, which
            // libtorch made current on this thread.
            match unsafe { cuda::cuStreamQuery(std::ptr::null_mut()) } {
                cuda::CUresult::CUDA_SUCCESS => return Ok(()),
                cuda::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(self.abort(what, format!("CUDA stream error {other:?}"))),
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is a live communicator and `state` a valid out-pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if state != sys::ncclResult_t::ncclSuccess && state != sys::ncclResult_t::ncclInProgress {
                return Err(self.abort(what, format!("asynchronous error {state:?}")));
            }
            if let Some(timeout) = self.op_timeout.filter(|t| started.elapsed() >= *t) {
                let rank = self.rank;
                self.abort(what, "timed out".to_string());
                return Err(CollectiveError::Timeout { rank: if rank == 0 { 1 } else { 0 }, after: timeout });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn abort(&mut self, what: &str, problem: String) -> CollectiveError {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: the communicator is live and aborted once; it is not used afterwards.
            let _ = unsafe { result::comm_abort(self.comm) };
            tracing::warn!(rank = self.rank, what, %problem, "aborted the NCCL communicator");
        }
        nccl_error(self.rank, what, problem)
    }

    /// Packs `tensors` into one f32 buffer on the device, runs `op` on it, and copies it back.
    fn in_place(
        &mut self,
        tensors: &[Tensor],
        op: impl FnOnce(&mut Self, &Tensor, usize) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let device = Device::Cuda(self.device_index);
        let flat = Tensor::cat(
            &tensors
                .iter()
                .map(|t| t.detach().to_device(device).to_kind(Kind::Float).reshape([-1]))
                .collect::<Vec<_>>(),
            0,
        )
        .contiguous();
        let count = flat.numel();
        tch::Cuda::synchronize(self.device_index as i64);
        op(self, &flat, count)?;
        let mut offset = 0i64;
        tch::no_grad(|| {
            for t in tensors {
                let n = t.numel() as i64;
                let part = flat.narrow(0, offset, n).view(t.size().as_slice());
                t.shallow_clone().copy_(&part.to_kind(t.kind()));
                offset += n;
            }
        });
        Ok(())
    }
}

impl GradientCollective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<(), CollectiveError> {
        if self.aborted {
            return Err(nccl_error(self.rank, "all-reduce", "the communicator was aborted"));
        }
        let (comm, rank, world) = (self.comm, self.rank, self.world_size as f64);
        self.in_place(tensors, |this, flat, count| {
            let ptr = flat.data_ptr();
            // SAFETY: `flat` is a live contiguous f32 CUDA tensor of `count` elements; in-place
            // all-reduce with send == recv is allowed; stream null = the legacy default stream
            // libtorch also uses, and both sides are synchronised around the call.
            unsafe {
                result::all_reduce(
                    ptr,
                    ptr,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    std::ptr::null_mut(),
                )
            }
            .map_err(|e| nccl_error(rank, "all-reduce", e))?;
            this.wait_for_collective("all-reduce")?;
            tch::no_grad(|| {
                let _ = flat.shallow_clone().g_div_scalar_(world);
            });
            Ok(())
        })
    }

    fn broadcast_from_root(&mut self, tensors: &[Tensor]) -> Result<(), CollectiveError> {
        if self.aborted {
            return Err(nccl_error(self.rank, "broadcast", "the communicator was aborted"));
        }
        let (comm, rank) = (self.comm, self.rank);
        self.in_place(tensors, |this, flat, count| {
            let ptr = flat.data_ptr();
            // SAFETY: as in all_reduce_mean; in-place broadcast from root 0.
            unsafe {
                result::broadcast(ptr, ptr, count, sys::ncclDataType_t::ncclFloat32, 0, comm, std::ptr::null_mut())
            }
            .map_err(|e| nccl_error(rank, "broadcast", e))?;
            this.wait_for_collective("broadcast")
        })
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.aborted {
            return; // ncclCommAbort freed it
        }
        // SAFETY: the communicator was initialised by comm_init_rank and is destroyed once.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}
