//! Reconnection after a coordinator restart, against a real coordinator run in-process on its own
//! tokio runtime with a run directory. "Killing" it shuts that runtime down in the background
//! (every task dropped where it stands, no graceful path, as with SIGKILL); the restarted one
//! binds the same port and resumes from the same run directory, and so knows none of the
//! processes registered before. The client side must notice (NOT_FOUND "unknown worker id"),
//! register again on its own and carry on: a blocking [`CoordinatorLink`] call, the heartbeat
//! task of a [`Membership`], and concurrent renewals that must register only once.

use medtvt_coordinator::in_process::InProcessCoordinator;
use medtvt_coordinator::state::StateOptions;
use medtvt_coordinator::ServerOptions;
use medtvt_proto::client::{self, Client, ConnectOptions};
use medtvt_proto::v1 as pb;
use medtvt_role::membership::{JoinOptions, Membership};
use medtvt_role::registration::Registration;
use medtvt_role::rpc::{CoordinatorLink, RetryPolicy, StopFlag};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// A coordinator "process" on `addr` (see [`InProcessCoordinator`]) with quick reaping and no
/// shutdown grace.
async fn start(run_dir: &Path, addr: SocketAddr) -> InProcessCoordinator {
    let options = ServerOptions {
        run_dir: Some(run_dir.to_path_buf()),
        reap_interval: Duration::from_millis(20),
        shutdown_grace: Duration::ZERO,
        state: StateOptions {
            heartbeat_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_millis(100),
        },
        ..ServerOptions::default()
    };
    InProcessCoordinator::start(addr, options)
        .await
        .unwrap_or_else(|err| panic!("the coordinator does not start: {err}"))
}

/// A data directory with `n` disease prompts, and a GRPO job config over it.
fn grpo_job(dir: &Path, n: usize) -> String {
    let lines: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"split":"train","kind":"disease","id":"d{i}","answer":"<answer>sepsis</answer>"}}"#))
        .collect();
    std::fs::write(dir.join("qa.jsonl"), lines.join("\n") + "\n").unwrap();
    format!(
        "[run]\nname = \"reconnect\"\nstage = \"grpo\"\nout_dir = \"out\"\nseed = 1\n\n[data]\ndir = \"{}\"\n\n[model]\n\n\
         [train]\nsteps = 3\nlearning_rate = 0.001\n\n[grpo]\ngroup_size = 2\nprompts_per_step = 2\nmax_new_tokens = 4\n\n\
         [cluster]\nlearners = 1\n",
        dir.display()
    )
}

async fn connect(url: &str) -> Client {
    // Enough attempts to ride out a restart in the middle of a test.
    let options = ConnectOptions {
        attempts: 50,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..ConnectOptions::default()
    };
    client::connect_with(url, None, &options).await.unwrap()
}

fn worker_request(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest { role: pb::Role::RolloutWorker as i32, name: name.into(), rank: 0, world_size: 0 }
}

async fn workers(url: &str) -> Vec<pb::WorkerInfo> {
    let mut c = connect(url).await;
    c.get_status(pb::StatusRequest::default()).await.unwrap().into_inner().workers
}

fn lease_keys(lease: &pb::Lease) -> Vec<(u64, u64)> {
    lease.prompts.iter().map(|p| (p.prompt_id, p.epoch)).collect()
}

/// LeasePrompts from a blocking thread, as a rollout worker's job loop makes it.
async fn lease(link: &CoordinatorLink, job_id: u64) -> pb::Lease {
    let link = link.clone();
    tokio::task::spawn_blocking(move || {
        link.call_as_worker("LeasePrompts", |mut c, worker_id| async move {
            c.lease_prompts(pb::LeaseRequest { worker_id, job_id, max_prompts: 2 }).await
        })
    })
    .await
    .unwrap()
    .expect("the lease call succeeds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_call_registers_again_after_a_restart_and_leases_the_returned_prompts() {
    let data = tempfile::tempdir().unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let first = start(run_dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let (addr, url) = (first.addr(), first.url());
    let mut client = connect(&url).await;
    let job_id = client
        .submit_job(pb::SubmitJobRequest { config_toml: grpo_job(data.path(), 6), overrides: vec![] })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let registration = Registration::register(client.clone(), worker_request("worker-r")).await.unwrap();
    let old_id = registration.worker_id();
    let retry = RetryPolicy {
        window: Duration::from_secs(20),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    };
    let link = CoordinatorLink::new(
        tokio::runtime::Handle::current(),
        client.clone(),
        registration.clone(),
        StopFlag::default(),
    )
    .with_retry(retry);
    let before = lease(&link, job_id).await;
    assert_eq!(before.prompts.len(), 2);

    first.kill();
    let second = start(run_dir.path(), addr).await;
    assert!(second.resumed(), "the restarted coordinator resumes the run");
    let after = lease(&link, job_id).await;

    let new_id = link.worker_id();
    assert_ne!(new_id, old_id, "the process holds a new worker id");
    assert_eq!(registration.worker_id(), new_id, "the id is shared with the registration");
    // The prompts leased before the restart went back to the queue and come out first.
    assert_eq!(lease_keys(&after), lease_keys(&before));
    let known = workers(&second.url()).await;
    assert_eq!(known.iter().map(|w| (w.worker_id, w.name.as_str())).collect::<Vec<_>>(), vec![(new_id, "worker-r")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_renewals_of_the_same_stale_id_register_once() {
    let run_dir = tempfile::tempdir().unwrap();
    let first = start(run_dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let (addr, url) = (first.addr(), first.url());
    let client = connect(&url).await;
    let registration = Registration::register(client.clone(), worker_request("worker-c")).await.unwrap();
    let stale = registration.worker_id();
    first.kill();
    let _second = start(run_dir.path(), addr).await;
    let renewals: Vec<_> = (0..4)
        .map(|_| {
            let (registration, client) = (registration.clone(), client.clone());
            tokio::spawn(async move {
                // The first call after the restart may still meet the dead connection.
                loop {
                    match registration.renew(client.clone(), stale).await {
                        Ok(id) => return id,
                        Err(status) if status.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Err(status) => panic!("renew failed: {status}"),
                    }
                }
            })
        })
        .collect();
    let mut ids = Vec::new();
    for renewal in renewals {
        ids.push(renewal.await.unwrap());
    }
    assert!(ids.iter().all(|id| *id == ids[0] && *id != stale), "{ids:?} (stale {stale})");
    let known = workers(&url).await;
    assert_eq!(known.len(), 1, "one registration for four renewals: {known:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_heartbeat_registers_again_on_its_own() {
    let run_dir = tempfile::tempdir().unwrap();
    let first = start(run_dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let (addr, url) = (first.addr(), first.url());
    let options = JoinOptions {
        coordinator: url.clone(),
        auth_token_file: None,
        role: pb::Role::Learner,
        name: "learner-h".into(),
        rank: 0,
        world_size: 1,
        max_message_bytes: medtvt_proto::DEFAULT_MAX_MESSAGE_BYTES,
    };
    let membership = Membership::join(&options).await.unwrap();
    let old_id = membership.worker_id();
    first.kill();
    let _second = start(run_dir.path(), addr).await;
    // No call is made here: only the heartbeat task (every 100 ms) can bring the process back.
    let deadline = Instant::now() + Duration::from_secs(15);
    let known = loop {
        let known = workers(&url).await;
        if !known.is_empty() {
            break known;
        }
        assert!(Instant::now() < deadline, "the learner never registered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(membership.worker_id(), old_id);
    let summary: Vec<_> = known.iter().map(|w| (w.worker_id, w.name.as_str(), w.role, w.rank)).collect();
    assert_eq!(summary, vec![(membership.worker_id(), "learner-h", pb::Role::Learner as i32, 0)]);
    membership.leave().await;
    assert!(workers(&url).await.is_empty(), "leave deregisters the current id");
}
