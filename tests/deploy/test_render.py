"""Unit tests of deploy/render.py: kustomize's hash and merge rules on small kustomizations, its
refusal of what it does not implement, and `local-commands` on the real overlays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
import render  # noqa: E402

CPU_DEMO = REPO / "deploy" / "k8s" / "overlays" / "cpu-demo"
GPU = REPO / "deploy" / "k8s" / "overlays" / "gpu"


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


DEPLOYMENT = """\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: app}
    spec:
      template:
        spec:
          containers:
            - name: main
              image: medtvt
              args: [coordinator, --config, a.toml]
              env:
                - {name: A, value: "1"}
                - {name: B, value: "2"}
              volumeMounts:
                - {name: cfg, mountPath: /etc/cfg}
          volumes:
            - name: cfg
              configMap: {name: settings}
"""


class RenderTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.root = Path(self.tmp.name)

    def test_generated_names_match_kustomize_and_references_follow(self) -> None:
        # `kubectl kustomize` (kustomize 5.5) names these x-4h2mbtbbt6, settings-4c6d6ftd8f (Go's
        # JSON escapes <&> before hashing) and sec-dbdgd77ct8.
        write_tree(self.root, {
            "kustomization.yaml": """\
                resources: [app.yaml]
                configMapGenerator:
                  - {name: x, literals: [a=b]}
                  - {name: settings, files: [s.txt, renamed.txt=s.txt]}
                secretGenerator:
                  - {name: sec, literals: [token=abc]}
            """,
            "app.yaml": DEPLOYMENT,
            "s.txt": "<&>\n",
        })
        objects = {o["kind"]: o for o in render.render(self.root) if o["kind"] != "ConfigMap"}
        generated = {o["metadata"]["name"]: o for o in render.render(self.root) if o["kind"] in ("ConfigMap", "Secret")}
        self.assertEqual(sorted(generated), ["sec-dbdgd77ct8", "settings-4c6d6ftd8f", "x-4h2mbtbbt6"])
        settings = "settings-4c6d6ftd8f"
        self.assertEqual(generated[settings]["data"], {"renamed.txt": "<&>\n", "s.txt": "<&>\n"})
        self.assertEqual(generated["sec-dbdgd77ct8"]["data"], {"token": "YWJj"})
        volume = objects["Deployment"]["spec"]["template"]["spec"]["volumes"][0]
        self.assertEqual(volume["configMap"]["name"], settings)

    def test_strategic_merge_by_key_patch_items_first_and_lists_replaced(self) -> None:
        write_tree(self.root, {
            "base/kustomization.yaml": "resources: [app.yaml]\n",
            "base/app.yaml": DEPLOYMENT,
            "overlay/kustomization.yaml": """\
                resources: [../base]
                images: [{name: medtvt, newName: registry.local:5000/medtvt, newTag: "1.2"}]
                patches:
                  - patch: |
                      apiVersion: apps/v1
                      kind: Deployment
                      metadata: {name: app}
                      spec:
                        replicas: 3
                        template:
                          spec:
                            containers:
                              - name: main
                                args: [coordinator, --config, b.toml]
                                env:
                                  - {name: B, value: "20"}
                                  - {name: C, value: "$(B)"}
                                volumeMounts: null
            """,
        })
        (deployment,) = render.render(self.root / "overlay")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(deployment["spec"]["replicas"], 3)
        self.assertEqual(container["args"], ["coordinator", "--config", "b.toml"])
        self.assertEqual([(e["name"], e["value"]) for e in container["env"]], [("B", "20"), ("C", "$(B)"), ("A", "1")])
        self.assertNotIn("volumeMounts", container)
        self.assertEqual(container["image"], "registry.local:5000/medtvt:1.2")

    def test_what_it_does_not_implement_is_an_error(self) -> None:
        cases = {
            "namePrefix: x-\n": "namePrefix not supported",
            "resources: [../outside.yaml]\n": "outside the kustomization directory",
            "patches: [{path: p.yaml, target: {kind: Deployment}}]\n": "targets and options are not supported",
            "configMapGenerator: [{name: x, envs: [a.env]}]\n": "envs not supported",
        }
        (self.root / "outside.yaml").write_text(DEPLOYMENT)
        for text, message in cases.items():
            directory = write_tree(self.root / f"case{len(message)}", {"kustomization.yaml": text, "p.yaml": DEPLOYMENT})
            with self.subTest(text=text):
                with self.assertRaisesRegex(render.RenderError, message):
                    render.render(directory)

    def test_a_patch_without_a_target_is_an_error(self) -> None:
        write_tree(self.root, {
            "kustomization.yaml": "resources: [app.yaml]\npatches: [{path: p.yaml}]\n",
            "app.yaml": DEPLOYMENT,
            "p.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: other}\n",
        })
        with self.assertRaisesRegex(render.RenderError, "patch target Deployment/other not found"):
            render.render(self.root)


class LocalCommandsTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.root = Path(self.tmp.name)

    def local(self, overlay: Path, *args: str) -> list[dict]:
        result = subprocess.run([sys.executable, str(REPO / "deploy" / "render.py"), "local-commands", str(overlay),
                                 "--root", str(self.root), *args], capture_output=True, text=True, check=True)
        return json.loads(result.stdout)

    def test_cpu_demo_runs_on_loopback_with_shared_volume_and_ranks(self) -> None:
        processes = self.local(CPU_DEMO, "--port", "50051=47001", "--binary", "/opt/medtvt", "--auth-token", "t0k")
        self.assertEqual([(p["role"], p["replica"], p["replicas"]) for p in processes], [
            ("coordinator", 0, 1), ("rollout-worker", 0, 2), ("rollout-worker", 1, 2), ("learner", 0, 2), ("learner", 1, 2)])
        coordinator, worker0, worker1, learner0, learner1 = processes

        self.assertEqual(coordinator["argv"][:3], ["/opt/medtvt", "coordinator", "--config"])
        config = Path(coordinator["argv"][3])
        self.assertEqual(config.read_text(), (REPO / "configs" / "tiny-grpo.toml").read_text())
        self.assertEqual(coordinator["env"]["MEDTVT_LISTEN"], "127.0.0.1:47001")
        self.assertEqual(coordinator["ready"], {"grpc_health": "127.0.0.1:47001", "service": "medtvt.v1.Coordinator"})

        for process in processes:
            env = process["env"]
            self.assertEqual(Path(env["MEDTVT_AUTH_TOKEN_FILE"]).read_text(), "t0k")
            self.assertNotIn("OTEL_EXPORTER_OTLP_ENDPOINT", env)
            self.assertTrue(Path(env["HOME"]).is_dir())
            # Relative config paths (runs/demo/...) resolve from cwd onto the one shared claim.
            self.assertEqual((Path(process["cwd"]) / "runs").resolve(), (self.root / "volumes/medtvt-shared/runs").resolve())
        for process in processes[1:]:
            self.assertEqual(process["env"]["MEDTVT_COORDINATOR"], "http://127.0.0.1:47001")
        self.assertNotEqual(worker0["env"]["MEDTVT_WORKER_NAME"], worker1["env"]["MEDTVT_WORKER_NAME"])
        self.assertEqual([learner0["env"]["MEDTVT_RANK"], learner1["env"]["MEDTVT_RANK"]], ["0", "1"])
        self.assertEqual(learner1["env"]["MEDTVT_WORLD_SIZE"], "2")
        self.assertEqual(learner1["env"]["OTEL_RESOURCE_ATTRIBUTES"], "k8s.pod.name=medtvt-learner-1,medtvt.rank=1")
        self.assertNotEqual(learner0["env"]["HOME"], learner1["env"]["HOME"])  # emptyDir is per pod
        self.assertEqual(coordinator["env"]["MEDTVT_RUN_DIR"], str(self.root / "volumes/medtvt-shared/runs/coordinator"))
        # A comma-separated list of paths moves entry by entry.
        shared = self.root / "volumes/medtvt-shared"
        self.assertEqual(coordinator["env"]["MEDTVT_JOB_ROOTS"].split(","),
                         [str(shared / sub) for sub in ("data", "models", "checkpoints", "runs")])

    def test_gpu_configs_get_their_absolute_paths_moved_onto_the_local_claim(self) -> None:
        processes = self.local(GPU, "--otlp-endpoint", "http://127.0.0.1:4317", "--env", "MEDTVT_DEVICE=cpu")
        coordinator = processes[0]
        text = Path(coordinator["argv"][3]).read_text()
        self.assertIn(f'dir = "{self.root}/volumes/medtvt-shared/data/medtvt-qa"', text)
        self.assertIn(f'out_dir = "{self.root}/volumes/medtvt-shared/checkpoints/medtvt/grpo"', text)
        self.assertTrue(all(p["env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4317" for p in processes))
        self.assertTrue(all(p["env"]["MEDTVT_DEVICE"] == "cpu" for p in processes))
        # The HPA owns the workers' count: locally, its minimum.
        self.assertEqual([p["replicas"] for p in processes if p["role"] == "rollout-worker"], [2, 2])
        self.assertTrue(os.access(Path(coordinator["env"]["MEDTVT_AUTH_TOKEN_FILE"]), os.R_OK))


if __name__ == "__main__":
    unittest.main()
