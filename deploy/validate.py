#!/usr/bin/env python3
"""Offline checks of deploy/: every overlay renders (deploy/render.py), every rendered object is
valid against the Kubernetes JSON schemas of every version from 1.31 to the newest that
kubernetes-validate ships (strict: an unknown field is an error), the objects agree with each
other and with the run config they carry, and the Dockerfile (parsed by BuildKit's parser)
copies only paths that exist and agrees with the build (torch version, entrypoint, user).
Run by scripts/validate_deploy.sh; prints one line per check and exits non-zero on any failure.

The cross-object checks catch what schemas cannot:
- the learner Job is Indexed with parallelism = completions = MEDTVT_WORLD_SIZE = the config's
  cluster.learners, and its rank comes from the job-completion-index annotation;
- the rollout-worker Deployment starts with the config's cluster.rollout_workers replicas, or,
  when an HPA scales it, has no replica count of its own (an apply would reset the HPA's) and
  an HPA range that contains cluster.rollout_workers;
- the coordinator's --config files are keys of the mounted ConfigMap, its probes are gRPC
  probes of medtvt.v1.Coordinator on its port, and it is one replica with Recreate;
- a cuda config gives learners and workers MEDTVT_DEVICE=cuda and one nvidia.com/gpu each, a cpu
  config none;
- every medtvt container reads the token from the medtvt-auth Secret and exports OTLP to a
  Service port 4317 that exists; every pod runs as non-root;
- every path of the run config (data.dir, model.checkpoint, run.out_dir, resolved against the
  working directory) lies on the shared claim, writable where the role writes, and every pod
  mounts each claim sub-path at the same place;
- the coordinator confines submitted jobs (MEDTVT_JOB_ROOTS) to mounts of the shared claim, and
  those roots hold every path of the run config, so `medtvt train --coordinator` with the
  overlay's configs is accepted; it is never started with MEDTVT_INSECURE;
- the configs/ copies in each overlay are byte-identical to the repository's configs/;
- when `kubectl kustomize` exists, it renders exactly what deploy/render.py renders.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import dockerfile
import kubernetes_validate
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render  # noqa: E402  (deploy/render.py, beside this file)

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())
MIN_KUBERNETES = (1, 31)
AUTH_SECRET = "medtvt-auth"


class Checks:
    def __init__(self) -> None:
        self.failures = 0
        self.passes = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        print(f"{'ok  ' if ok else 'FAIL'} {what}{'' if ok or not detail else ': ' + detail}")
        self.failures += not ok
        self.passes += ok
        return ok


def kubernetes_versions() -> list[str]:
    versions = set()
    for version in kubernetes_validate.utils.all_versions():
        major, minor = (int(x) for x in version.split(".")[:2])
        if (major, minor) >= MIN_KUBERNETES:
            versions.add(version)
    return sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def schema_errors(obj: dict, versions: list[str]) -> list[str]:
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{version}: {err.message} at {'.'.join(str(p) for p in err.path)}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as err:
            errors.append(f"{version}: {err.message}")
    return errors


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def medtvt_containers(objects: list[dict]):
    """(workload, pod spec, container) for every medtvt container."""
    for obj in objects:
        for pod in render.pod_specs(obj):
            for container in pod["containers"]:
                if render.is_medtvt(container):
                    yield obj, pod, container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def role_of(container: dict) -> str:
    """The role a container runs: the coordinator image's one, or the all-roles image's subcommand."""
    args = render.MEDTVT_IMAGES.get(render.image_repository(container), []) + container.get("args", [])
    return args[0] if args else ""


def gpus(container: dict) -> str | None:
    return container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")


def coordinator_config(objects: list[dict], checks: Checks, where: str) -> dict | None:
    coordinator = by_kind(objects, "Deployment").get("medtvt-coordinator")
    if not checks.check(coordinator is not None, f"{where}: coordinator Deployment exists"):
        return None
    spec = coordinator["spec"]
    checks.check(spec.get("replicas") == 1 and spec.get("strategy", {}).get("type") == "Recreate",
                 f"{where}: coordinator is one replica with the Recreate strategy")
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    checks.check(render.image_repository(container) == "medtvt-coordinator",
                 f"{where}: coordinator runs the control-plane image medtvt-coordinator (no torch)", container["image"])
    ports = {p["containerPort"] for p in container.get("ports", [])}
    for probe in ("readinessProbe", "livenessProbe"):
        grpc = container.get(probe, {}).get("grpc", {})
        checks.check(grpc.get("port") in ports and grpc.get("service") == "medtvt.v1.Coordinator",
                     f"{where}: coordinator {probe} is a native gRPC probe of medtvt.v1.Coordinator")
    args = container.get("args", [])
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    if not checks.check(len(files) >= 1, f"{where}: coordinator is given --config"):
        return None
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_maps = by_kind(objects, "ConfigMap")
    config = None
    for file in files:
        directory, _, key = file.rpartition("/")
        volume = volumes.get(mounts.get(directory, ""), {})
        data = config_maps.get(volume.get("configMap", {}).get("name", ""), {}).get("data", {})
        if checks.check(key in data, f"{where}: --config {file} is in the mounted ConfigMap"):
            config = tomllib.loads(data[key])  # the last one is the run the cluster is sized for
    return config


def check_workloads(objects: list[dict], config: dict, checks: Checks, where: str) -> None:
    cluster = config.get("cluster", {})
    learners = cluster.get("learners", 2)
    device = config.get("model", {}).get("device", "cpu")

    job = by_kind(objects, "Job").get("medtvt-learner")
    if checks.check(job is not None, f"{where}: learner Job exists"):
        spec = job["spec"]
        env = env_of(spec["template"]["spec"]["containers"][0])
        world = env.get("MEDTVT_WORLD_SIZE", {}).get("value")
        checks.check(spec.get("completionMode") == "Indexed"
                     and spec.get("parallelism") == spec.get("completions") == learners
                     and world == str(learners),
                     f"{where}: learner Job is Indexed, parallelism = completions = MEDTVT_WORLD_SIZE "
                     f"= cluster.learners = {learners}",
                     f"parallelism {spec.get('parallelism')}, completions {spec.get('completions')}, "
                     f"MEDTVT_WORLD_SIZE {world}")
        rank = env.get("MEDTVT_RANK", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        checks.check(rank == render.COMPLETION_INDEX,
                     f"{where}: MEDTVT_RANK comes from the job-completion-index annotation")

    workers = by_kind(objects, "Deployment").get("medtvt-rollout-worker")
    if checks.check(workers is not None, f"{where}: rollout-worker Deployment exists"):
        wanted = cluster.get("rollout_workers", 2)
        hpa = render.autoscaler_of(objects, workers)
        if hpa is None:
            checks.check(workers["spec"].get("replicas") == wanted,
                         f"{where}: rollout workers start at cluster.rollout_workers = {wanted}",
                         f"replicas {workers['spec'].get('replicas')}")
        else:
            low, high = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
            checks.check("replicas" not in workers["spec"] and low <= wanted <= high,
                         f"{where}: the HPA alone sizes the rollout workers, from {low} to {high} "
                         f"around cluster.rollout_workers = {wanted}",
                         f"Deployment replicas {workers['spec'].get('replicas')} (leave it out)")

    for obj, _, container in medtvt_containers(objects):
        role = role_of(container)
        if role not in ("learner", "rollout-worker"):
            continue
        env = env_of(container)
        want_gpu = "1" if device == "cuda" else None
        checks.check(env.get("MEDTVT_DEVICE", {}).get("value") == device and gpus(container) == want_gpu
                     and container.get("resources", {}).get("requests", {}).get("nvidia.com/gpu") == want_gpu,
                     f"{where}: {role} runs on {device}" + (" with one GPU" if want_gpu else " without GPUs"))

    for hpa in by_kind(objects, "HorizontalPodAutoscaler").values():
        target = hpa["spec"]["scaleTargetRef"]
        checks.check(target["name"] in by_kind(objects, target["kind"]),
                     f"{where}: HPA {hpa['metadata']['name']} scales a {target['kind']} that exists")


def check_wiring(objects: list[dict], checks: Checks, where: str) -> None:
    services = by_kind(objects, "Service")
    for obj, pod, container in medtvt_containers(objects):
        what = f"{where}: {obj['metadata']['name']}"
        checks.check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{what} runs as non-root")
        env = env_of(container)
        token = env.get("MEDTVT_AUTH_TOKEN_FILE", {}).get("value", "")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        secret_dirs = [m["mountPath"] for m in container.get("volumeMounts", [])
                       if volumes[m["name"]].get("secret", {}).get("secretName") == AUTH_SECRET]
        checks.check(any(token.startswith(d + "/") for d in secret_dirs),
                     f"{what} reads MEDTVT_AUTH_TOKEN_FILE from the {AUTH_SECRET} Secret", token)
        otlp = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", {}).get("value", "")
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", otlp)
        ok = bool(match) and match.group(2) == "4317" and any(
            p["port"] == 4317 for p in services.get(match.group(1), {}).get("spec", {}).get("ports", []))
        checks.check(ok, f"{what} exports OTLP to a collector Service port 4317", otlp)
        coordinator = env.get("MEDTVT_COORDINATOR", {}).get("value")
        if coordinator:
            match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", coordinator)
            ok = bool(match) and any(str(p["port"]) == match.group(2)
                                     for p in services.get(match.group(1), {}).get("spec", {}).get("ports", []))
            checks.check(ok, f"{what} points MEDTVT_COORDINATOR at the coordinator Service", coordinator)


def claim_mounts(pod: dict, container: dict) -> dict[str, tuple[str, str, bool]]:
    """mountPath -> (claim, subPath, readOnly) for the container's PersistentVolumeClaim mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    table = {}
    for mount in container.get("volumeMounts", []):
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        if claim:
            table[mount["mountPath"]] = (claim["claimName"], mount.get("subPath", ""), bool(mount.get("readOnly")))
    return table


def on_claim(path: str, working_dir: str, mounts: dict[str, tuple[str, str, bool]]) -> tuple[str, str, bool] | None:
    absolute = path if path.startswith("/") else f"{working_dir.rstrip('/')}/{path}"
    for mount_path in sorted(mounts, key=len, reverse=True):
        if absolute == mount_path or absolute.startswith(mount_path + "/"):
            return mounts[mount_path]
    return None


def check_paths(objects: list[dict], config: dict, checks: Checks, where: str) -> None:
    seen: dict[tuple[str, str], set[str]] = {}
    for obj, pod, container in medtvt_containers(objects):
        for mount_path, (claim, sub, _) in claim_mounts(pod, container).items():
            seen.setdefault((claim, sub), set()).add(mount_path)
    checks.check(all(len(paths) == 1 for paths in seen.values()),
                 f"{where}: every pod mounts each claim sub-path at the same path",
                 str({f"{c}/{s}": sorted(p) for (c, s), p in seen.items() if len(p) > 1}))

    paths = {"data.dir": (config["data"]["dir"], False), "run.out_dir": (config["run"]["out_dir"], True)}
    if config.get("model", {}).get("checkpoint"):
        paths["model.checkpoint"] = (config["model"]["checkpoint"], False)
    writers = {"coordinator", "learner"}  # rank 0 writes checkpoints; the coordinator its state
    for obj, pod, container in medtvt_containers(objects):
        role = role_of(container)
        mounts = claim_mounts(pod, container)
        for key, (path, written) in paths.items():
            where_it_lies = on_claim(path, container.get("workingDir", "/"), mounts)
            ok = where_it_lies is not None and (not written or role not in writers or not where_it_lies[2])
            checks.check(ok, f"{where}: {role}: {key} = {path} is on the shared claim"
                         + (" and writable" if written and role in writers else ""))
        run_dir = env_of(container).get("MEDTVT_RUN_DIR", {}).get("value")
        if run_dir:
            place = on_claim(run_dir, container.get("workingDir", "/"), mounts)
            checks.check(place is not None and not place[2], f"{where}: {role}: MEDTVT_RUN_DIR is on the claim, writable")
        if role == "coordinator":
            check_job_roots(container, mounts, paths, checks, where)


def check_job_roots(container: dict, mounts: dict[str, tuple[str, str, bool]], paths: dict[str, tuple[str, bool]],
                    checks: Checks, where: str) -> None:
    """The coordinator's MEDTVT_JOB_ROOTS: mount points of the claim that hold every config path."""
    env = env_of(container)
    checks.check("MEDTVT_INSECURE" not in env and "--insecure" not in container.get("args", []),
                 f"{where}: coordinator is not started --insecure")
    value = env.get("MEDTVT_JOB_ROOTS", {}).get("value", "")
    roots = [r for r in value.split(",") if r]
    if not checks.check(bool(roots), f"{where}: coordinator confines submitted jobs with MEDTVT_JOB_ROOTS"):
        return
    checks.check(all(r in mounts for r in roots), f"{where}: coordinator: every job root is a mount of the shared claim",
                 ", ".join(r for r in roots if r not in mounts))
    working_dir = container.get("workingDir", "/")
    for key, (path, _) in paths.items():
        absolute = path if path.startswith("/") else f"{working_dir.rstrip('/')}/{path}"
        inside = any(absolute == r or absolute.startswith(r.rstrip("/") + "/") for r in roots)
        checks.check(inside, f"{where}: coordinator: {key} = {path} lies under a job root", value)


def check_config_copies(overlay: Path, checks: Checks) -> None:
    for copy in sorted((overlay / "configs").glob("*.toml")):
        original = REPO / "configs" / copy.name
        checks.check(original.is_file() and original.read_bytes() == copy.read_bytes(),
                     f"{overlay.name}: configs/{copy.name} is identical to the repository's configs/{copy.name}",
                     f"cp configs/{copy.name} {copy.relative_to(REPO)}")


def check_against_kubectl(overlay: Path, objects: list[dict], checks: Checks) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print(f"skip {overlay.name}: kubectl not installed, no cross-check of deploy/render.py against kustomize")
        return
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True)
    if result.returncode != 0:
        checks.check(False, f"{overlay.name}: kubectl kustomize renders it", result.stderr.strip())
        return
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    checks.check(theirs == objects, f"{overlay.name}: kubectl kustomize renders exactly what deploy/render.py renders",
                 "objects differ (diff `deploy/render.py render` with `kubectl kustomize`)")


def check_local_commands(overlay: Path, objects: list[dict], config: dict, checks: Checks) -> None:
    with tempfile.TemporaryDirectory() as root:
        processes = render.local_commands(objects, Path(root), {50051: 45678})
        roles = [p["role"] for p in processes]
        learners = config.get("cluster", {}).get("learners", 2)
        ranks = sorted(int(p["env"]["MEDTVT_RANK"]) for p in processes if p["role"] == "learner")
        checks.check(roles[0] == "coordinator" and ranks == list(range(learners))
                     and all(p["env"].get("MEDTVT_COORDINATOR", "http://127.0.0.1:45678") == "http://127.0.0.1:45678"
                             for p in processes)
                     and all(Path(p["env"]["MEDTVT_AUTH_TOKEN_FILE"]).is_file() for p in processes),
                     f"{overlay.name}: local-commands starts the coordinator first, ranks 0..{learners - 1}, "
                     "all on 127.0.0.1 with a token file", str(roles))


def parse_dockerfile(checks: Checks, name: str) -> list | None:
    """Parsed with BuildKit's own parser (the `dockerfile` package), so a syntax error fails too;
    every COPY/ADD source must exist in the build context and not be excluded by the image's
    .dockerignore, and every --from stage must exist."""
    path = REPO / "deploy" / name
    try:
        commands = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as err:
        checks.check(False, f"{name}: parses", str(err))
        return None
    checks.check(True, f"{name}: parses ({len(commands)} instructions)")
    ignore = [line.strip() for line in (REPO / "deploy" / f"{name}.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    stages = [c.value[2] for c in commands if c.cmd == "FROM" and len(c.value) == 3 and c.value[1].upper() == "AS"]
    for command in commands:
        if command.cmd not in ("COPY", "ADD"):
            continue
        source_stage = next((f.split("=", 1)[1] for f in command.flags if f.startswith("--from=")), None)
        if source_stage is not None:
            checks.check(source_stage in stages, f"{name}: {command.original}: stage {source_stage} exists")
            continue
        for source in command.value[:-1]:
            ignored = source != "." and any(fnmatch.fnmatch(source, p) or source.startswith(p.rstrip("/") + "/")
                                            for p in ignore)
            checks.check((REPO / source).exists() and not ignored,
                         f"{name}: {command.cmd} {source} exists in the build context")
    users = [c.value[0] for c in commands if c.cmd == "USER"]
    checks.check(bool(users) and users[-1].split(":")[0] not in ("root", "0"), f"{name}: the image runs as a non-root user")
    return commands


def check_dockerfile(checks: Checks) -> None:
    """The all-roles image: the medtvt binary with the torch it links."""
    commands = parse_dockerfile(checks, "Dockerfile")
    if commands is None:
        return
    args = dict(v.split("=", 1) for c in commands if c.cmd == "ARG" for v in c.value if "=" in v)
    torch = re.search(r"^TORCH_VERSION=(\S+)", (REPO / "scripts" / "setup_venv.sh").read_text(), re.M)
    checks.check(bool(torch) and args.get("TORCH_VERSION") == torch.group(1),
                 "Dockerfile: runtime torch version = scripts/setup_venv.sh's (the libtorch the binary links)")
    entrypoint = [c for c in commands if c.cmd == "ENTRYPOINT"]
    checks.check(bool(entrypoint) and entrypoint[-1].json and list(entrypoint[-1].value) == ["medtvt"],
                 'Dockerfile: ENTRYPOINT ["medtvt"] (deploy/render.py and the manifests assume it)')
    runs = " ".join(" ".join(c.value) for c in commands if c.cmd == "RUN")
    checks.check("cargo build --release --locked --bin medtvt" in runs, "Dockerfile: builds the medtvt binary")
    checks.check("scripts/setup_venv.sh" in runs, "Dockerfile: the builder links the torch of scripts/setup_venv.sh")
    library_path = next((c.value[1] for c in commands if c.cmd == "ENV" and c.value[0] == "LD_LIBRARY_PATH"), "")
    checks.check("${TORCH_LIB}" in library_path.split(":") and "/opt/medtvt/nccl" in library_path.split(":")
                 and "" not in library_path.split(":"),
                 "Dockerfile: LD_LIBRARY_PATH has torch/lib and the libnccl.so link, and no empty entry", library_path)


def check_coordinator_dockerfile(checks: Checks) -> None:
    """The control-plane image: medtvt-coordinator alone, nothing of torch."""
    name = "Dockerfile.coordinator"
    commands = parse_dockerfile(checks, name)
    if commands is None:
        return
    entrypoint = [c for c in commands if c.cmd == "ENTRYPOINT"]
    checks.check(bool(entrypoint) and entrypoint[-1].json and list(entrypoint[-1].value) == ["medtvt-coordinator"],
                 f'{name}: ENTRYPOINT ["medtvt-coordinator"]')
    runs = " ".join(" ".join(c.value) for c in commands if c.cmd == "RUN")
    checks.check("cargo build --release --locked -p medtvt-coordinator --bin medtvt-coordinator" in runs,
                 f"{name}: builds the medtvt-coordinator binary only")
    text = " ".join(c.original for c in commands).lower()
    checks.check("torch" not in text and "setup_venv" not in text and "nccl" not in text and "cuda" not in text,
                 f"{name}: no torch, CUDA or NCCL in the image")


def main() -> int:
    checks = Checks()
    versions = kubernetes_versions()
    print(f"Kubernetes schemas: {', '.join(versions)} (strict)")
    standalone = sorted((K8S / "tools").glob("*.yaml")) if (K8S / "tools").is_dir() else []
    for overlay in OVERLAYS:
        where = overlay.name
        try:
            objects = render.render(overlay)
        except render.RenderError as err:
            checks.check(False, f"{where}: renders", str(err))
            continue
        checks.check(True, f"{where}: renders ({len(objects)} objects)")
        for obj in objects:
            errors = schema_errors(obj, versions)
            checks.check(not errors, f"{where}: {obj['kind']}/{obj['metadata']['name']} is schema-valid", "; ".join(errors))
        check_against_kubectl(overlay, objects, checks)
        check_config_copies(overlay, checks)
        config = coordinator_config(objects, checks, where)
        if config is None:
            continue
        check_workloads(objects, config, checks, where)
        check_wiring(objects, checks, where)
        check_paths(objects, config, checks, where)
        check_local_commands(overlay, objects, config, checks)
    for path in standalone:
        for obj in render.load_objects(path):
            errors = schema_errors(obj, versions)
            checks.check(not errors, f"tools/{path.name}: {obj['kind']}/{obj['metadata']['name']} is schema-valid",
                         "; ".join(errors))
    check_dockerfile(checks)
    check_coordinator_dockerfile(checks)
    print(f"validate-deploy: {checks.passes} passed, {checks.failures} failed")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
