"""deploy/validate.py's cross-object checks fail on the mistakes they exist for: a world size that
disagrees with the config, a run-config path off the shared claim, a GPU learner without a GPU."""

from __future__ import annotations

import contextlib
import io
import sys
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
import render  # noqa: E402
import validate  # noqa: E402


def failures(objects: list[dict], check) -> list[str]:
    checks = validate.Checks()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        config = validate.coordinator_config(objects, checks, "t")
        check(objects, config, checks, "t")
    return [line for line in out.getvalue().splitlines() if line.startswith("FAIL")]


def find(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


class CrossChecksTest(unittest.TestCase):
    def setUp(self) -> None:
        self.gpu = render.render(REPO / "deploy/k8s/overlays/gpu")
        self.cpu = render.render(REPO / "deploy/k8s/overlays/cpu-demo")

    def test_the_shipped_overlays_pass(self) -> None:
        for objects in (self.gpu, self.cpu):
            self.assertEqual(failures(objects, validate.check_workloads), [])
            self.assertEqual(failures(objects, validate.check_paths), [])

    def test_world_size_must_match_the_config(self) -> None:
        find(self.gpu, "Job", "medtvt-learner")["spec"]["parallelism"] = 3
        (failure,) = failures(self.gpu, validate.check_workloads)
        self.assertIn("parallelism 3, completions 2, MEDTVT_WORLD_SIZE 2", failure)

    def test_a_gpu_learner_needs_a_gpu(self) -> None:
        container = find(self.gpu, "Job", "medtvt-learner")["spec"]["template"]["spec"]["containers"][0]
        del container["resources"]["limits"]["nvidia.com/gpu"]
        (failure,) = failures(self.gpu, validate.check_workloads)
        self.assertIn("learner runs on cuda with one GPU", failure)

    def test_relative_config_paths_must_land_on_the_claim(self) -> None:
        pod = find(self.cpu, "Job", "medtvt-learner")["spec"]["template"]["spec"]
        pod["containers"][0]["workingDir"] = "/home/medtvt"
        found = failures(self.cpu, validate.check_paths)
        self.assertTrue(any("learner: run.out_dir = runs/demo/grpo is on the shared claim" in f for f in found), found)

    def test_config_paths_must_lie_under_the_coordinators_job_roots(self) -> None:
        container = find(self.gpu, "Deployment", "medtvt-coordinator")["spec"]["template"]["spec"]["containers"][0]
        roots = next(e for e in container["env"] if e["name"] == "MEDTVT_JOB_ROOTS")
        roots["value"] = "/models,/workspace/runs,/etc"
        found = failures(self.gpu, validate.check_paths)
        self.assertTrue(any("data.dir = /data/medtvt-qa lies under a job root" in f for f in found), found)
        self.assertTrue(any("every job root is a mount of the shared claim: /etc" in f for f in found), found)
        container["env"].remove(roots)
        found = failures(self.gpu, validate.check_paths)
        self.assertTrue(any("confines submitted jobs with MEDTVT_JOB_ROOTS" in f for f in found), found)


if __name__ == "__main__":
    unittest.main()
