"""Runs deploy/slurm/medtvt-grpo.sbatch on this machine against stand-ins for srun, scontrol and
medtvt (tests/deploy/fake-slurm) and checks what a Slurm job would start: the coordinator first
and ready, one learner per rank with the world size, rollout workers on the GPUs left, the token
and library paths every process gets, and that nothing is left running afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "slurm" / "medtvt-grpo.sbatch"
FAKES = Path(__file__).resolve().parent / "fake-slurm"


def parse_record(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class SlurmScriptTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="medtvt-slurm-test-"))
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.records = self.tmp / "records"
        self.records.mkdir()
        # A torch install as the script expects one: site-packages/{torch/lib, nvidia/nccl/lib}.
        site = self.tmp / "site-packages"
        (site / "torch" / "lib").mkdir(parents=True)
        (site / "nvidia" / "nccl" / "lib").mkdir(parents=True)
        (site / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_text("")
        self.torch_lib = site / "torch" / "lib"
        self.run_dir = self.tmp / "run"

    def run_script(self, **overrides: str) -> subprocess.CompletedProcess:
        env = {
            "PATH": f"{FAKES}:{os.environ['PATH']}",
            "HOME": str(self.tmp),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node[1]",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_GPUS_ON_NODE": "4",
            "RUN_DIR": str(self.run_dir),
            "COORDINATOR_PORT": "50999",
            "MEDTVT_TORCH_LIB": str(self.torch_lib),
            "READY_TIMEOUT_S": "20",
            "FAKE_MEDTVT_RECORDS": str(self.records),
            "FAKE_SLURM_LOG": str(self.tmp / "srun.log"),
        }
        env.update(overrides)
        result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60)
        self.addCleanup(self.assert_nothing_left)
        return result

    def records_of(self, role: str) -> list[dict[str, str]]:
        return [parse_record(p) for p in sorted(self.records.glob(f"{role}-*.env"))]

    def assert_nothing_left(self) -> None:
        pids = []
        for name in ("coordinator.pid", "workers.pid"):
            path = self.records / name
            if path.exists():
                pids += [int(p) for p in path.read_text().split()]
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse([p for p in pids if alive(p)], "coordinator or workers still running after the job")

    def test_starts_every_role_with_its_rank_token_and_libraries(self) -> None:
        result = self.run_script(FAKE_EXPECT_WORKERS="2")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("coordinator listening on 0.0.0.0:50999", result.stdout)

        (coordinator,) = self.records_of("coordinator")
        config = REPO / "configs" / "llama-3.2-1b-grpo.toml"
        self.assertEqual(coordinator["ARGS"], f"--config {config}")
        self.assertEqual(coordinator["MEDTVT_LISTEN"], "0.0.0.0:50999")
        self.assertEqual(coordinator["MEDTVT_RUN_DIR"], f"{self.run_dir}/coordinator")

        learners = self.records_of("learner")
        # llama-3.2-1b-grpo.toml: cluster.learners = 2; the other 2 of 4 GPUs run workers.
        self.assertEqual(sorted(r["MEDTVT_RANK"] for r in learners), ["0", "1"])
        workers = self.records_of("rollout-worker")
        self.assertEqual(len(workers), 2)
        self.assertEqual(len({w["MEDTVT_WORKER_NAME"] for w in workers}), 2)
        for record in learners + workers:
            self.assertEqual(record["MEDTVT_COORDINATOR"], "http://127.0.0.1:50999")
            self.assertEqual(record["MEDTVT_DEVICE"], "cuda")
            self.assertEqual(record["MEDTVT_AUTH_TOKEN_FILE"], f"{self.run_dir}/auth-token")
            self.assertTrue(record["LD_LIBRARY_PATH"].startswith(f"{self.torch_lib}:{self.run_dir}/nccl-lib"))
        for learner in learners:
            self.assertEqual(learner["MEDTVT_WORLD_SIZE"], "2")

        token = self.run_dir / "auth-token"
        self.assertEqual(token.stat().st_mode & 0o777, 0o600)
        self.assertEqual(len(token.read_text()), 64)
        nccl = self.run_dir / "nccl-lib" / "libnccl.so"
        self.assertEqual(nccl.resolve(), (self.torch_lib.parent.parent / "nvidia/nccl/lib/libnccl.so.2").resolve())

    def test_learner_parameters_and_given_token_file_are_used(self) -> None:
        token = self.tmp / "my-token"
        token.write_text("secret")
        result = self.run_script(LEARNERS="3", ROLLOUT_WORKERS="1", MEDTVT_AUTH_TOKEN_FILE=str(token),
                                 MEDTVT_CONFIG="configs/tiny-grpo.toml", FAKE_EXPECT_WORKERS="1")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        learners = self.records_of("learner")
        self.assertEqual(sorted(r["MEDTVT_RANK"] for r in learners), ["0", "1", "2"])
        self.assertTrue(all(r["MEDTVT_WORLD_SIZE"] == "3" for r in learners))
        self.assertTrue(all(r["MEDTVT_AUTH_TOKEN_FILE"] == str(token) for r in learners))
        self.assertEqual(len(self.records_of("rollout-worker")), 1)
        self.assertFalse((self.run_dir / "auth-token").exists())

    def test_a_failed_learner_fails_the_job_and_stops_everything(self) -> None:
        result = self.run_script(FAKE_LEARNER_STATUS="3")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("stopped (exit", result.stdout)

    def test_a_coordinator_that_dies_is_reported_before_anything_else_starts(self) -> None:
        result = self.run_script(FAKE_COORDINATOR_FAILS="1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("exited before it was ready", result.stderr)
        self.assertEqual(self.records_of("learner"), [])

    def test_too_few_gpus_is_an_error_naming_the_numbers(self) -> None:
        result = self.run_script(SLURM_GPUS_ON_NODE="2")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("no GPU left for rollout workers: 2 GPUs, 2 learners", result.stderr)


if __name__ == "__main__":
    unittest.main()
