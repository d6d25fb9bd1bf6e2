//! Averaging gradients across learner ranks.
//!
//! `GradientCollective` is what a learner step needs: an in-place mean all-reduce and a broadcast
//! from rank 0 (to start every rank from identical weights). `TcpCollective` implements it for
//! machines without GPUs: a star over TCP where rank 0 sums the ranks' buffers in rank order and
//! sends the mean back, so every rank receives the very same bytes and the ranks' weights stay
//! bit-identical after every step (a ring all-reduce would be faster for large models but sums in
//! a rank-dependent order). On CUDA, NCCL's all-reduce serves the same role.
//!
//! No operation waits forever: set-up (accepting and connecting) and, after
//! [`TcpCollective::with_op_timeout`], every read and write on a peer's socket fail with
//! [`CollectiveError::Timeout`] after `cluster.collective_timeout_s`, so a dead, stopped or cut-off
//! rank is noticed by the ranks waiting for it (a rank that died also closes its sockets, which
//! its peers see at once).

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("collective: cannot reach rank 0 at {addr} within {waited:?}: {source}")]
    Connect { addr: SocketAddr, waited: Duration, source: std::io::Error },
    #[error("collective: rank {rank}: {source}")]
    Io { rank: usize, source: std::io::Error },
    #[error("collective: rank {rank} sent {got} values, expected {expected}")]
    SizeMismatch { rank: usize, got: u64, expected: u64 },
    #[error("collective: rank {rank} is at operation {got}, expected {expected} (ranks out of step)")]
    OutOfStep { rank: usize, got: u64, expected: u64 },
    #[error("collective: a peer announced rank {got}, outside world size {world_size}")]
    BadRank { got: u64, world_size: usize },
    #[error("collective: rank {rank} did not answer within {after:?} (dead, stopped or cut off?)")]
    Timeout { rank: usize, after: Duration },
    #[error("collective: this rank is between learner groups (its collective was closed)")]
    Disconnected,
}

impl CollectiveError {
    /// An I/O error on the link with `rank`; a socket timeout becomes [`CollectiveError::Timeout`].
    fn io(rank: usize, source: std::io::Error, timeout: Option<Duration>) -> Self {
        match (source.kind(), timeout) {
            (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(after)) => {
                CollectiveError::Timeout { rank, after }
            }
            _ => CollectiveError::Io { rank, source },
        }
    }
}

/// What the learner needs from a collective.
pub trait GradientCollective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces each tensor by the mean of that tensor over all ranks.
    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<(), CollectiveError>;
    /// Replaces each tensor by rank 0's value.
    fn broadcast_from_root(&mut self, tensors: &[Tensor]) -> Result<(), CollectiveError>;
}

/// The collective of a rank between two learner groups: its old sockets are closed (so that
/// peers still waiting on them notice at once) and every operation fails.
pub struct Disconnected;

impl GradientCollective for Disconnected {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _tensors: &[Tensor]) -> Result<(), CollectiveError> {
        Err(CollectiveError::Disconnected)
    }
    fn broadcast_from_root(&mut self, _tensors: &[Tensor]) -> Result<(), CollectiveError> {
        Err(CollectiveError::Disconnected)
    }
}

/// The trivial collective of a single learner.
pub struct SingleRank;

impl GradientCollective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _tensors: &[Tensor]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast_from_root(&mut self, _tensors: &[Tensor]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

type Link = (BufReader<TcpStream>, BufWriter<TcpStream>);

/// Star-topology collective over TCP for CPU learners.
pub struct TcpCollective {
    rank: usize,
    world_size: usize,
    /// Rank 0: links to ranks 1..W in rank order. Other ranks: the link to rank 0.
    links: Vec<Link>,
    /// Counts operations so that ranks that fall out of step fail loudly instead of mixing data.
    op: u64,
    /// How long one read or write on a peer's socket may block (`None`: forever).
    op_timeout: Option<Duration>,
}

impl TcpCollective {
    /// Rank 0: accept W-1 connections on `listener` within `timeout`. Every other rank: connect to
    /// `root`, retrying until `timeout` (rank 0 may start later).
    pub fn connect(
        rank: usize,
        world_size: usize,
        listener: Option<TcpListener>,
        root: SocketAddr,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let io = |source| CollectiveError::Io { rank, source };
        let mut links = Vec::new();
        if rank == 0 {
            let listener = match listener {
                Some(l) => l,
                None => TcpListener::bind(root).map_err(io)?,
            };
            let mut by_rank: Vec<Option<Link>> = (0..world_size).map(|_| None).collect();
            let deadline = Instant::now() + timeout;
            listener.set_nonblocking(true).map_err(io)?;
            for _ in 1..world_size {
                let missing = (1..world_size).find(|r| by_rank[*r].is_none()).unwrap_or(1);
                let stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        Err(e) => return Err(CollectiveError::io(missing, e, Some(timeout))),
                    }
                };
                stream.set_nonblocking(false).map_err(io)?;
                stream.set_read_timeout(Some(timeout)).map_err(io)?;
                let mut link = split(stream).map_err(io)?;
                let peer = read_u64(&mut link.0).map_err(|e| CollectiveError::io(0, e, Some(timeout)))?;
                if peer == 0 || peer as usize >= world_size {
                    return Err(CollectiveError::BadRank { got: peer, world_size });
                }
                by_rank[peer as usize] = Some(link);
            }
            links = by_rank.into_iter().skip(1).flatten().collect();
        } else {
            let started = Instant::now();
            let stream = loop {
                match TcpStream::connect(root) {
                    Ok(s) => break s,
                    Err(source) if started.elapsed() >= timeout => {
                        return Err(CollectiveError::Connect { addr: root, waited: timeout, source })
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            let mut link = split(stream).map_err(io)?;
            write_u64(&mut link.1, rank as u64).map_err(io)?;
            link.1.flush().map_err(io)?;
            links.push(link);
        }
        Ok(TcpCollective { rank, world_size, links, op: 0, op_timeout: None })
    }

    /// Makes every later read and write on a peer's socket fail after `timeout`.
    pub fn with_op_timeout(mut self, timeout: Duration) -> Result<Self, CollectiveError> {
        for (i, (reader, _)) in self.links.iter().enumerate() {
            let peer = if self.rank == 0 { i + 1 } else { 0 };
            let stream = reader.get_ref();
            let io = |source| CollectiveError::Io { rank: peer, source };
            stream.set_read_timeout(Some(timeout)).map_err(io)?;
            stream.set_write_timeout(Some(timeout)).map_err(io)?;
        }
        self.op_timeout = Some(timeout);
        Ok(self)
    }

    /// Root's side of one operation: gather (optionally), combine, scatter.
    fn root_exchange(&mut self, mut buffer: Vec<f32>, reduce: bool) -> Result<Vec<f32>, CollectiveError> {
        if reduce {
            for (i, (reader, _)) in self.links.iter_mut().enumerate() {
                let peer = i + 1;
                let incoming = read_frame(reader, self.op, buffer.len() as u64, peer, self.op_timeout)?;
                for (acc, x) in buffer.iter_mut().zip(incoming) {
                    *acc += x;
                }
            }
            let w = self.world_size as f32;
            buffer.iter_mut().for_each(|x| *x /= w);
        }
        for (i, (_, writer)) in self.links.iter_mut().enumerate() {
            write_frame(writer, self.op, &buffer).map_err(|e| CollectiveError::io(i + 1, e, self.op_timeout))?;
        }
        Ok(buffer)
    }

    fn leaf_exchange(&mut self, buffer: Vec<f32>, reduce: bool) -> Result<Vec<f32>, CollectiveError> {
        let (reader, writer) = &mut self.links[0];
        if reduce {
            write_frame(writer, self.op, &buffer).map_err(|e| CollectiveError::io(0, e, self.op_timeout))?;
        }
        read_frame(reader, self.op, buffer.len() as u64, 0, self.op_timeout)
    }

    fn exchange(&mut self, tensors: &[Tensor], reduce: bool) -> Result<(), CollectiveError> {
        if self.world_size == 1 {
            return Ok(());
        }
        let flat = flatten(tensors);
        let result = if self.rank == 0 { self.root_exchange(flat, reduce)? } else { self.leaf_exchange(flat, reduce)? };
        self.op += 1;
        unflatten_into(&result, tensors);
        Ok(())
    }
}

impl GradientCollective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<(), CollectiveError> {
        self.exchange(tensors, true)
    }
    fn broadcast_from_root(&mut self, tensors: &[Tensor]) -> Result<(), CollectiveError> {
        self.exchange(tensors, false)
    }
}

fn split(stream: TcpStream) -> std::io::Result<Link> {
    stream.set_nodelay(true)?;
    let reader = BufReader::with_capacity(1 << 20, stream.try_clone()?);
    Ok((reader, BufWriter::with_capacity(1 << 20, stream)))
}

/// All tensors as one f32 vector, in order.
fn flatten(tensors: &[Tensor]) -> Vec<f32> {
    let mut out = Vec::with_capacity(tensors.iter().map(|t| t.numel()).sum());
    for t in tensors {
        let flat = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
        let values: Vec<f32> = Vec::<f32>::try_from(&flat).expect("a contiguous f32 CPU tensor converts to Vec<f32>");
        out.extend_from_slice(&values);
    }
    out
}

fn unflatten_into(values: &[f32], tensors: &[Tensor]) {
    let mut offset = 0;
    for t in tensors {
        let n = t.numel();
        let src = Tensor::from_slice(&values[offset..offset + n]).view(t.size().as_slice());
        tch::no_grad(|| {
            let mut dst = t.shallow_clone();
            dst.copy_(&src.to_device(t.device()).to_kind(t.kind()));
        });
        offset += n;
    }
}

fn write_u64(w: &mut impl Write, v: u64) -> std::io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Frame: operation number, value count, little-endian f32 values.
fn write_frame(w: &mut BufWriter<TcpStream>, op: u64, values: &[f32]) -> std::io::Result<()> {
    write_u64(w, op)?;
    write_u64(w, values.len() as u64)?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.write_all(&bytes)?;
    w.flush()
}

fn read_frame(
    r: &mut BufReader<TcpStream>,
    op: u64,
    expected: u64,
    rank: usize,
    timeout: Option<Duration>,
) -> Result<Vec<f32>, CollectiveError> {
    let io = |source| CollectiveError::io(rank, source, timeout);
    let got_op = read_u64(r).map_err(io)?;
    if got_op != op {
        return Err(CollectiveError::OutOfStep { rank, got: got_op, expected: op });
    }
    let n = read_u64(r).map_err(io)?;
    if n != expected {
        return Err(CollectiveError::SizeMismatch { rank, got: n, expected });
    }
    let mut bytes = vec![0u8; n as usize * 4];
    r.read_exact(&mut bytes).map_err(io)?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(world: usize) -> Vec<TcpCollective> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap();
        let mut handles = Vec::new();
        for rank in (1..world).rev() {
            handles.push(std::thread::spawn(move || {
                TcpCollective::connect(rank, world, None, root, Duration::from_secs(5)).unwrap()
            }));
        }
        let mut all = vec![TcpCollective::connect(0, world, Some(listener), root, Duration::from_secs(5)).unwrap()];
        let mut rest: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        rest.sort_by_key(|c| c.rank);
        all.extend(rest);
        all
    }

    fn run_all<F>(collectives: Vec<TcpCollective>, f: F) -> Vec<Vec<f32>>
    where
        F: Fn(&mut TcpCollective) -> Vec<f32> + Send + Sync + Copy + 'static,
    {
        let handles: Vec<_> = collectives.into_iter().map(|mut c| std::thread::spawn(move || f(&mut c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn three_ranks_get_the_identical_mean() {
        let results = run_all(start(3), |c| {
            let r = c.rank() as f32;
            let a = Tensor::from_slice(&[r, 2.0 * r, 0.1 + r]);
            let b = Tensor::from_slice(&[10.0 * r]).view([1, 1]);
            c.all_reduce_mean(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
            // A second operation checks the op counter stays in step.
            c.all_reduce_mean(&[b.shallow_clone()]).unwrap();
            let mut v = Vec::<f32>::try_from(&a).unwrap();
            v.extend(Vec::<f32>::try_from(&b.view([-1])).unwrap());
            v
        });
        let expected_first = [1.0f32, 2.0, (0.1 + 1.1 + 2.1) / 3.0, 10.0];
        for v in &results {
            for (x, e) in v.iter().zip(expected_first) {
                assert!((x - e).abs() < 1e-6, "{v:?}");
            }
        }
        // Bit-identical across ranks.
        assert!(results.iter().all(|v| v.iter().map(|x| x.to_bits()).eq(results[0].iter().map(|x| x.to_bits()))));
    }

    #[test]
    fn broadcast_copies_rank_zero() {
        let results = run_all(start(2), |c| {
            let t = Tensor::from_slice(&[c.rank() as f32 + 5.0; 4]);
            c.broadcast_from_root(&[t.shallow_clone()]).unwrap();
            Vec::<f32>::try_from(&t).unwrap()
        });
        assert_eq!(results, vec![vec![5.0; 4], vec![5.0; 4]]);
    }

    #[test]
    fn mismatched_sizes_are_reported() {
        let results = run_all(start(2), |c| {
            let t = Tensor::zeros([1 + c.rank() as i64], (Kind::Float, Device::Cpu));
            match c.all_reduce_mean(&[t]) {
                Err(CollectiveError::SizeMismatch { rank: 1, got: 2, expected: 1 }) => vec![1.0],
                Err(_) => vec![0.5],
                Ok(()) => vec![0.0],
            }
        });
        assert_eq!(results[0], vec![1.0], "rank 0 names rank 1's wrong size");
    }

    #[test]
    fn a_silent_peer_times_out_and_a_dead_one_is_seen_at_once() {
        let mut ranks = start(2).into_iter();
        let root = ranks.next().unwrap().with_op_timeout(Duration::from_millis(300)).unwrap();
        let leaf = ranks.next().unwrap();
        let mut root = root;
        let t = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        // The leaf is alive but never sends (as if stopped): rank 0 gives up after the timeout.
        let started = Instant::now();
        let err = root.all_reduce_mean(std::slice::from_ref(&t)).unwrap_err();
        assert!(matches!(err, CollectiveError::Timeout { rank: 1, .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        // The leaf's process ends: its socket closes and the next operation fails at once.
        drop(leaf);
        let started = Instant::now();
        let err = root.all_reduce_mean(std::slice::from_ref(&t)).unwrap_err();
        assert!(matches!(err, CollectiveError::Io { rank: 1, .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(250), "{:?}", started.elapsed());
    }

    #[test]
    fn rank_zero_stops_waiting_for_a_rank_that_never_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap();
        let err = TcpCollective::connect(0, 2, Some(listener), root, Duration::from_millis(200)).err().unwrap();
        assert!(matches!(err, CollectiveError::Timeout { rank: 1, .. }), "{err}");
    }

    #[test]
    fn leaf_reports_unreachable_root() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = TcpCollective::connect(1, 2, None, addr, Duration::from_millis(200)).err().unwrap();
        assert!(err.to_string().contains("cannot reach rank 0 at 127.0.0.1:1"), "{err}");
    }
}
