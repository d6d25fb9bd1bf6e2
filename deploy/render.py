#!/usr/bin/env python3
"""Renders MedTVT's kustomize overlays without a kustomize binary, and turns a rendered overlay
into the command lines a test can start on loopback.

Why it exists: no kustomize binary can be installed from the package registries the project's
machines and CI reach, yet `make test` must check that every overlay renders to valid objects.
This is a small, honest implementation of only the kustomize subset deploy/k8s uses; anything
else in a kustomization.yaml is an error ("not supported by deploy/render.py"), never silently
ignored. Where `kubectl kustomize` exists, scripts/validate_deploy.sh checks that both render the
same objects.

The subset:
- `resources`: YAML files (multi-document) and directories holding a kustomization (recursive);
- `configMapGenerator` / `secretGenerator`: `name`, `files` (`path` or `key=path`), `literals`,
  `type` (secrets); names get kustomize's content-hash suffix (same hash as kustomize, unless
  `generatorOptions.disableNameSuffixHash`), and references to them in pod specs are renamed;
- `patches`: strategic-merge patches from `path` or inline `patch`, matched by kind and name
  (no `target`, no JSON 6902, no `$patch` directives). Lists merge by their Kubernetes merge key
  (containers, env, volumes, imagePullSecrets by name; volumeMounts by mountPath; ports by
  containerPort / port), the patch's items first as kustomize orders them; every other list is
  replaced, and `null` deletes a key;
- `images`: `name` with `newName`, `newTag`, `digest`.

Commands:
    deploy/render.py render OVERLAY              # the rendered objects, as multi-document YAML
    deploy/render.py local-commands OVERLAY [--root DIR] [--port 50051=PORT] [--binary PATH]
                     [--otlp-endpoint URL] [--auth-token TEXT] [--env KEY=VALUE]

`local-commands` prints, as JSON, one entry per process a cluster would run for each medtvt
container (each Deployment replica, or its HPA's minReplicas; each Indexed Job index), in start
order (processes with a readiness probe first):
    [{"role", "name", "replica", "replicas", "argv", "env", "cwd", "mounts", "ready"}, ...]
with everything resolved to local test values under --root (a fresh temporary directory when not
given), which stands in for every pod's filesystem:
- argv: the image's ENTRYPOINT followed by the container's args, with `$(VAR)` references
  expanded as the kubelet does. The all-roles image's ENTRYPOINT is `medtvt` (or --binary); the
  coordinator image's `medtvt-coordinator` runs locally as `medtvt coordinator` (the same process
  runner, `medtvt_coordinator::run_process`, in the all-roles binary), so one binary serves all;
- env: the container's env only (merge it over your own environment), with downward-API fields
  (pod name, namespace, the job-completion-index annotation = rank), ConfigMap and Secret keys
  resolved; the Secret `medtvt-auth` holds --auth-token;
- paths: an absolute path under a volume mount is rewritten to that volume's local directory:
  a PersistentVolumeClaim sub-path to ROOT/volumes/CLAIM/SUBPATH (shared by every process, as on
  the cluster), a ConfigMap or Secret to a directory holding its files (in `.toml` files, quoted
  absolute paths on a claim are rewritten the same way), an emptyDir to a per-process directory;
  cwd is ROOT/pods/NAME/rootfs/WORKINGDIR with links for mounts below it, so relative paths in
  the tiny configs (`runs/demo/...`) land on the claim too;
- addresses: `SERVICE:PORT` of a Service backed by a medtvt process, and `0.0.0.0:PORT`, become
  `127.0.0.1:LOCAL` (LOCAL = PORT unless --port PORT=LOCAL); OTEL_EXPORTER_OTLP_ENDPOINT, which
  points at the in-cluster collector, is dropped unless --otlp-endpoint gives one;
- ready: {"grpc_health": "127.0.0.1:LOCAL", "service": ...} from a gRPC readiness probe.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml


class RenderError(Exception):
    """A kustomization this renderer cannot render faithfully, or an overlay it cannot run."""


# ---------------------------------------------------------------------------------------------
# Rendering (the kustomize subset)
# ---------------------------------------------------------------------------------------------

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {
    "apiVersion", "kind", "resources", "configMapGenerator", "secretGenerator",
    "generatorOptions", "patches", "images",
}
GENERATOR_KEYS = {"name", "files", "literals", "type", "behavior"}

# kustomize's legacy output order, by kind; kinds not listed come after, by name.
KIND_ORDER = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
    "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
    "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]


def render(directory: str | Path) -> list[dict]:
    """The objects `kustomize build DIRECTORY` would output, in kustomize's order."""
    objects, _ = _render(Path(directory))
    return sorted(objects, key=_order_key)


def _order_key(obj: dict) -> tuple:
    kind = obj.get("kind", "")
    rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    return (rank, kind if rank == len(KIND_ORDER) else "", obj["metadata"].get("name", ""))


def load_kustomization(directory: Path) -> dict:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            spec = yaml.safe_load(path.read_text()) or {}
            unknown = set(spec) - SUPPORTED_KEYS
            if unknown:
                raise RenderError(f"{path}: {', '.join(sorted(unknown))} not supported by deploy/render.py")
            return spec
    raise RenderError(f"{directory}: no kustomization.yaml")


def _render(directory: Path) -> tuple[list[dict], dict]:
    """(objects, renames) for one kustomization; renames maps (kind, name) to generated names."""
    spec = load_kustomization(directory)
    objects: list[dict] = []
    renames: dict[tuple[str, str], str] = {}
    for entry in spec.get("resources", []):
        path = _load_path(directory, entry, directory_anywhere=True)
        if path.is_dir():
            sub_objects, sub_renames = _render(path)
            objects += sub_objects
            renames.update(sub_renames)
        else:
            objects += load_objects(path)
    options = spec.get("generatorOptions", {})
    if set(options) - {"disableNameSuffixHash"}:
        raise RenderError(f"{directory}: generatorOptions other than disableNameSuffixHash not supported")
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for generator in spec.get(key, []):
            obj = generate(kind, generator, directory)
            if not options.get("disableNameSuffixHash"):
                original = obj["metadata"]["name"]
                obj["metadata"]["name"] = f"{original}-{kustomize_hash(obj)}"
                renames[(kind, original)] = obj["metadata"]["name"]
            objects.append(obj)
    _check_unique(objects, directory)
    for patch_entry in spec.get("patches", []):
        for patch in _load_patches(patch_entry, directory):
            _apply_patch(objects, patch, directory)
    for image in spec.get("images", []):
        apply_image(objects, image)
    rename_references(objects, renames)
    return objects, renames


def _load_path(directory: Path, relative: str, directory_anywhere: bool = False) -> Path:
    """A path a kustomization names, under kustomize's load restriction: a file must lie inside
    the kustomization's directory; another kustomization (a directory) may be anywhere."""
    path = (directory / relative).resolve()
    if not path.exists():
        raise RenderError(f"{directory}: {relative} does not exist")
    if not (directory_anywhere and path.is_dir()) and directory.resolve() not in path.parents:
        raise RenderError(f"{directory}: {relative} is outside the kustomization directory "
                          "(kustomize refuses to load it; copy the file in)")
    return path


def load_objects(path: Path) -> list[dict]:
    objects = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "name" not in obj.get("metadata", {}):
            raise RenderError(f"{path}: every document must be an object with kind and metadata.name")
    return objects


def _check_unique(objects: list[dict], directory: Path) -> None:
    seen = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in seen:
            raise RenderError(f"{directory}: {key[0]}/{key[1]} defined twice")
        seen.add(key)


def generate(kind: str, generator: dict, directory: Path) -> dict:
    """A ConfigMap or Secret from a configMapGenerator / secretGenerator entry."""
    unknown = set(generator) - GENERATOR_KEYS
    if unknown or generator.get("behavior", "create") != "create":
        raise RenderError(f"{directory}: generator {generator.get('name')}: "
                          f"{', '.join(sorted(unknown)) or 'behavior'} not supported by deploy/render.py")
    data: dict[str, str] = {}
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for entry in generator.get("files", []):
        key, _, relative = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = _load_path(directory, relative)
        data[key or path.name] = path.read_text()
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}}
    if kind == "Secret":
        obj["type"] = generator.get("type", "Opaque")
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(data.items())}
    else:
        obj["data"] = dict(sorted(data.items()))
    return obj


def kustomize_hash(obj: dict) -> str:
    """kustomize's name suffix: sha256 of the Go-JSON encoding of {kind, name, data[, type]},
    first 10 hex digits with 0,1,3,a,e mapped to g,h,k,m,t (api/hasher in kustomize). kustomize
    looks the name up with a path kyaml does not split, so it always hashes an empty name
    (checked against kubectl kustomize 5.5: literal a=b in ConfigMap x gives x-4h2mbtbbt6)."""
    encoded = {"kind": obj["kind"], "name": "", "data": obj.get("data", {})}
    if obj["kind"] == "Secret":
        encoded["type"] = obj.get("type", "Opaque")
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these for safe embedding in HTML; the hash depends on it.
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _load_patches(entry: dict, directory: Path) -> list[dict]:
    if set(entry) - {"path", "patch"} or len(entry) != 1:
        raise RenderError(f"{directory}: patches entries need exactly `path` or `patch` "
                          "(targets and options are not supported by deploy/render.py)")
    text = _load_path(directory, entry["path"]).read_text() if "path" in entry else entry["patch"]
    patches = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    for patch in patches:
        if not isinstance(patch, dict) or "kind" not in patch:
            raise RenderError(f"{directory}: only strategic-merge patches (objects with kind and "
                              "metadata.name) are supported by deploy/render.py")
    return patches


def _api_group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def _apply_patch(objects: list[dict], patch: dict, directory: Path) -> None:
    name = patch.get("metadata", {}).get("name")
    for i, obj in enumerate(objects):
        if (obj["kind"] == patch["kind"] and obj["metadata"]["name"] == name
                and _api_group(obj.get("apiVersion", "")) == _api_group(patch.get("apiVersion", ""))):
            objects[i] = strategic_merge(obj, patch)
            return
    raise RenderError(f"{directory}: patch target {patch['kind']}/{name} not found")


def _merge_key(field: str, items: list) -> str | None:
    """The Kubernetes patchMergeKey of the list-valued fields deploy/k8s patches."""
    if field in ("containers", "initContainers", "ephemeralContainers", "env", "volumes",
                 "imagePullSecrets"):
        return "name"
    if field == "volumeMounts":
        return "mountPath"
    if field == "ports":
        return "containerPort" if any("containerPort" in p for p in items) else "port"
    return None


def strategic_merge(base, patch, field: str = ""):
    """Kubernetes strategic-merge of `patch` into `base` (for the field kinds listed above)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if any(k.startswith("$") for k in patch):
            raise RenderError(f"{field}: $-directives are not supported by deploy/render.py")
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(patch, list) and isinstance(base, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        # As kustomize orders them: the patch's items (merged into their base item, if any)
        # first, then the base items the patch does not name. Order matters for env: $(VAR)
        # only sees variables defined earlier in the list.
        named = {item.get(key) for item in patch}
        merged = []
        for item in patch:
            match = next((b for b in base if b.get(key) == item.get(key)), None)
            merged.append(copy.deepcopy(item) if match is None else strategic_merge(match, item, field))
        return merged + [copy.deepcopy(b) for b in base if b.get(key) not in named]
    return copy.deepcopy(patch)


def pod_specs(obj: dict) -> list[dict]:
    """The pod specs inside a workload object (none for other kinds)."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod.get("containers", [])


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is not a tag."""
    name, _, digest = image.partition("@")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def apply_image(objects: list[dict], image: dict) -> None:
    """kustomize's `images` transformer: a new name, tag or digest for containers using `name`."""
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise RenderError(f"images entry {image}: only name, newName, newTag, digest are supported")
    for obj in objects:
        for pod in pod_specs(obj):
            for container in _containers(pod):
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "digest" in image:
                    tag, digest = None, image["digest"]
                elif "newTag" in image:
                    tag, digest = str(image["newTag"]), None
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def rename_references(objects: list[dict], renames: dict[tuple[str, str], str]) -> None:
    """Points pod-spec references to generated ConfigMaps/Secrets at their hashed names."""
    def renamed(kind: str, holder: dict, field: str) -> None:
        if holder and (kind, holder.get(field)) in renames:
            holder[field] = renames[(kind, holder[field])]

    for obj in objects:
        for pod in pod_specs(obj):
            for volume in pod.get("volumes", []):
                renamed("ConfigMap", volume.get("configMap"), "name")
                renamed("Secret", volume.get("secret"), "secretName")
                for source in volume.get("projected", {}).get("sources", []):
                    renamed("ConfigMap", source.get("configMap"), "name")
                    renamed("Secret", source.get("secret"), "name")
            for secret in pod.get("imagePullSecrets", []):
                renamed("Secret", secret, "name")
            for container in _containers(pod):
                for env in container.get("env", []):
                    source = env.get("valueFrom", {})
                    renamed("ConfigMap", source.get("configMapKeyRef"), "name")
                    renamed("Secret", source.get("secretKeyRef"), "name")
                for env_from in container.get("envFrom", []):
                    renamed("ConfigMap", env_from.get("configMapRef"), "name")
                    renamed("Secret", env_from.get("secretRef"), "name")


# ---------------------------------------------------------------------------------------------
# local-commands: a rendered overlay as loopback processes
# ---------------------------------------------------------------------------------------------

ENTRYPOINT = "medtvt"    # deploy/Dockerfile's ENTRYPOINT
# The repository names (last path component) of the MedTVT images, with what runs each locally:
# the all-roles image's ENTRYPOINT, and the coordinator image's as the same binary's subcommand.
MEDTVT_IMAGES = {"medtvt": [], "medtvt-coordinator": ["coordinator"]}
OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


class LocalCluster:
    """Local stand-ins for what a cluster gives a pod: volumes, addresses, downward API."""

    def __init__(self, objects: list[dict], root: Path, ports: dict[int, int],
                 auth_token: str, otlp_endpoint: str | None):
        self.objects = objects
        self.root = root
        self.ports = ports
        self.otlp_endpoint = otlp_endpoint
        self.secrets = {"medtvt-auth": {"token": auth_token}}
        self.config_maps = {o["metadata"]["name"]: o.get("data", {})
                            for o in objects if o["kind"] == "ConfigMap"}
        for obj in objects:
            if obj["kind"] == "Secret":
                self.secrets[obj["metadata"]["name"]] = {
                    k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        self.services = self._services()

    def local_port(self, port: int) -> int:
        return self.ports.get(port, port)

    def _services(self) -> dict[str, dict[int, int | None]]:
        """Service name -> {service port: container port of a medtvt process, or None}."""
        services = {}
        for svc in (o for o in self.objects if o["kind"] == "Service"):
            selector = svc["spec"].get("selector", {})
            pods = [pod for obj in self.objects for pod in pod_specs(obj)
                    if selector and selector.items() <= _template_labels(obj).items()]
            table = {}
            for port in svc["spec"].get("ports", []):
                table[port["port"]] = None
                for pod in pods:
                    for container in pod["containers"]:
                        if not is_medtvt(container):
                            continue
                        for cport in container.get("ports", []):
                            target = port.get("targetPort", port["port"])
                            if target in (cport["containerPort"], cport.get("name")):
                                table[port["port"]] = cport["containerPort"]
            services[svc["metadata"]["name"]] = table
        return services

    def rewrite_addresses(self, value: str, what: str) -> str:
        def service(match: re.Match) -> str:
            name, port = match.group(1), int(match.group(2))
            target = self.services[name].get(port)
            if target is None:
                raise RenderError(f"{what}: {name}:{port} is not served by a medtvt process")
            return f"127.0.0.1:{self.local_port(target)}"

        if self.services:
            names = "|".join(re.escape(n) for n in sorted(self.services, key=len, reverse=True))
            value = re.sub(rf"\b({names})(?:\.[a-z0-9-]+(?:\.svc(?:\.cluster\.local)?)?)?:(\d+)\b",
                           service, value)
        return re.sub(r"(?:0\.0\.0\.0|\[::\]):(\d+)\b",
                      lambda m: f"127.0.0.1:{self.local_port(int(m.group(1)))}", value)


def image_repository(container: dict) -> str:
    return split_image(container["image"])[0].rsplit("/", 1)[-1]


def is_medtvt(container: dict) -> bool:
    return image_repository(container) in MEDTVT_IMAGES


def _template_labels(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj["metadata"].get("labels", {})
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return obj["spec"]["template"].get("metadata", {}).get("labels", {})


class LocalPod:
    """One replica of a workload: its mount table and filesystem under ROOT/pods/NAME."""

    def __init__(self, cluster: LocalCluster, pod: dict, name: str, index: int, labels: dict):
        self.cluster, self.pod, self.name, self.index, self.labels = cluster, pod, name, index, labels
        self.dir = cluster.root / "pods" / name
        self.volumes = {v["name"]: v for v in pod.get("volumes", [])}

    def mount_table(self, container: dict) -> dict[str, Path]:
        """mountPath -> local directory, materialising each volume."""
        table = {}
        for mount in container.get("volumeMounts", []):
            local = self._volume_dir(self.volumes[mount["name"]], mount.get("subPath", ""))
            if local is not None:
                table[mount["mountPath"].rstrip("/")] = local
        return table

    def _volume_dir(self, volume: dict, sub_path: str) -> Path | None:
        root = self.cluster.root
        if "persistentVolumeClaim" in volume:
            path = root / "volumes" / volume["persistentVolumeClaim"]["claimName"] / sub_path
        elif "emptyDir" in volume:
            path = self.dir / "emptydir" / volume["name"] / sub_path
        elif "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            ref = volume[kind]
            name = ref.get("name") or ref.get("secretName")
            data = (self.cluster.config_maps if kind == "configMap" else self.cluster.secrets).get(name)
            if data is None:
                if ref.get("optional"):
                    return None
                raise RenderError(f"pod {self.name}: {kind} {name} has no local value")
            path = root / "volumes" / f"{kind}-{name}"
            self._write_files(path, data, ref.get("items"), ref.get("defaultMode"))
            path = path / sub_path
        else:
            raise RenderError(f"pod {self.name}: volume {volume['name']}: only persistentVolumeClaim, "
                              "emptyDir, configMap and secret volumes have local stand-ins")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _write_files(self, path: Path, data: dict, items: list | None, mode: int | None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for key, value in data.items():
            targets = [i["path"] for i in items if i["key"] == key] if items else [key]
            for target in targets:
                if target.endswith(".toml"):
                    value = self._rewrite_toml_paths(value)
                file = path / target
                file.unlink(missing_ok=True)  # an earlier pod may have left it read-only
                file.write_text(value)
                if mode is not None:
                    file.chmod(mode)

    def _rewrite_toml_paths(self, text: str) -> str:
        claims = {}
        for container in self.pod["containers"]:
            for mount in container.get("volumeMounts", []):
                volume = self.volumes[mount["name"]]
                if "persistentVolumeClaim" in volume:
                    claims[mount["mountPath"].rstrip("/")] = self._volume_dir(volume, mount.get("subPath", ""))
        return re.sub(r'"(/[^"]*)"', lambda m: json.dumps(rewrite_path(m.group(1), claims)), text)

    def field(self, path: str) -> str:
        if path == "metadata.name":
            return self.name
        if path == "metadata.namespace":
            return "default"
        if path == COMPLETION_INDEX:
            return str(self.index)
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        if label:
            return self.labels.get(label.group(1), "")
        if path == "status.podIP":
            return "127.0.0.1"
        if path == "spec.nodeName":
            return "localhost"
        raise RenderError(f"pod {self.name}: downward-API field {path} has no local value")

    def root_dir(self, working_dir: str, mounts: dict[str, Path]) -> Path:
        """ROOT/pods/NAME/rootfs + working_dir, with links for the mounts below it."""
        rootfs = self.dir / "rootfs"
        cwd = rootfs / working_dir.lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        for mount_path, local in mounts.items():
            link = rootfs / mount_path.lstrip("/")
            if link.parent.is_relative_to(rootfs) and not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(local, target_is_directory=True)
        return cwd


def rewrite_path(value: str, mounts: dict[str, Path]) -> str:
    """An absolute path under a mount point, moved to that mount's local directory."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(mounts[mount_path]) + value[len(mount_path):]
    return value


def expand_vars(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def autoscaler_of(objects: list[dict], workload: dict) -> dict | None:
    """The HorizontalPodAutoscaler that scales `workload`, if any."""
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) == (workload["kind"], workload["metadata"]["name"]):
            return hpa
    return None


def replicas_of(objects: list[dict], obj: dict) -> int:
    """How many pods the cluster runs: an Indexed Job's indices, a Deployment's replicas, or the
    minimum of the HorizontalPodAutoscaler that owns a Deployment's count."""
    spec = obj["spec"]
    if obj["kind"] == "Job":
        if spec.get("completionMode") != "Indexed":
            return spec.get("parallelism", 1)
        return min(spec.get("parallelism", 1), spec.get("completions", 1))
    if obj["kind"] == "Pod":
        return 1
    hpa = autoscaler_of(objects, obj)
    if "replicas" not in spec and hpa is not None:
        return hpa["spec"].get("minReplicas", 1)
    return spec.get("replicas", 1)


def local_process(cluster: LocalCluster, obj: dict, pod: LocalPod, container: dict,
                  binary: str, extra_env: dict[str, str]) -> dict:
    mounts = pod.mount_table(container)
    cwd = pod.root_dir(container.get("workingDir", "/"), mounts)
    what = f"{obj['kind']}/{obj['metadata']['name']}"
    env: dict[str, str] = {}
    for var in container.get("env", []):
        env[var["name"]] = expand_vars(resolve_env(cluster, pod, var), env)
    if container.get("envFrom"):
        raise RenderError(f"{what}: envFrom has no local stand-in in deploy/render.py")
    env.update(extra_env)
    for key, value in list(env.items()):
        if key == OTLP_ENV:
            if cluster.otlp_endpoint:
                env[key] = cluster.otlp_endpoint
            else:
                del env[key]
            continue
        # Comma-separated lists of paths (MEDTVT_CONFIG, MEDTVT_JOB_ROOTS) move entry by entry.
        local = ",".join(rewrite_path(part, mounts) for part in value.split(","))
        env[key] = cluster.rewrite_addresses(local, f"{what} env {key}")
    subcommand = MEDTVT_IMAGES[image_repository(container)]
    argv = container.get("command") or [binary]
    argv = argv[:1] + subcommand + [expand_vars(a, env) for a in argv[1:] + container.get("args", [])]
    argv = [cluster.rewrite_addresses(rewrite_path(a, mounts), f"{what} args") for a in argv]
    ready = None
    probe = container.get("readinessProbe", {}).get("grpc")
    if probe:
        ready = {"grpc_health": f"127.0.0.1:{cluster.local_port(probe['port'])}",
                 "service": probe.get("service", "")}
    args = subcommand + container.get("args", [])
    return {
        "role": args[0] if args else container["name"],
        "name": pod.name,
        "replica": pod.index,
        "replicas": replicas_of(cluster.objects, obj),
        "argv": argv,
        "env": env,
        "cwd": str(cwd),
        "mounts": {k: str(v) for k, v in mounts.items()},
        "ready": ready,
    }


def resolve_env(cluster: LocalCluster, pod: LocalPod, var: dict) -> str:
    if "value" in var:
        return str(var["value"])
    source = var.get("valueFrom", {})
    if "fieldRef" in source:
        return pod.field(source["fieldRef"]["fieldPath"])
    for kind, table in (("configMapKeyRef", cluster.config_maps), ("secretKeyRef", cluster.secrets)):
        if kind in source:
            ref = source[kind]
            value = table.get(ref["name"], {}).get(ref["key"])
            if value is None:
                raise RenderError(f"pod {pod.name}: env {var['name']}: {ref['name']}/{ref['key']} has no local value")
            return value
    raise RenderError(f"pod {pod.name}: env {var['name']}: source {sorted(source)} has no local stand-in")


def local_commands(objects: list[dict], root: Path, ports: dict[int, int], binary: str = ENTRYPOINT,
                   auth_token: str = "local-test-token", otlp_endpoint: str | None = None,
                   extra_env: dict[str, str] | None = None) -> list[dict]:
    """Every medtvt process of a rendered overlay, resolved for loopback (see the module doc)."""
    cluster = LocalCluster(objects, root, ports, auth_token, otlp_endpoint)
    processes = []
    for obj in objects:
        for pod_spec in pod_specs(obj):
            for container in pod_spec["containers"]:
                if not is_medtvt(container):
                    continue
                for index in range(replicas_of(objects, obj)):
                    pod = LocalPod(cluster, pod_spec, f"{obj['metadata']['name']}-{index}", index,
                                   _template_labels(obj))
                    processes.append(local_process(cluster, obj, pod, container, binary, extra_env or {}))
    # Processes others wait for (a readiness probe) first; otherwise keep the render order.
    return sorted(processes, key=lambda p: p["ready"] is None)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the config files in ConfigMaps) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _port_pair(text: str) -> tuple[int, int]:
    key, value = _key_value(text)
    try:
        return int(key), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CONTAINER_PORT=LOCAL_PORT, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("render", help="print the rendered objects as YAML")
    show.add_argument("overlay")
    local = commands.add_parser("local-commands", help="print each medtvt process, resolved for loopback, as JSON")
    local.add_argument("overlay")
    local.add_argument("--root", help="directory standing in for the pods' filesystems (default: a new temporary one)")
    local.add_argument("--port", type=_port_pair, action="append", default=[], metavar="PORT=LOCAL",
                       help="serve container port PORT on 127.0.0.1:LOCAL (repeatable)")
    local.add_argument("--binary", default=ENTRYPOINT, help="argv[0] of every process (default: medtvt)")
    local.add_argument("--auth-token", default="local-test-token", help="contents of the medtvt-auth token file")
    local.add_argument("--otlp-endpoint", help=f"{OTLP_ENV} for every process (default: unset)")
    local.add_argument("--env", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="extra environment for every process, e.g. MEDTVT_DEVICE=cpu (repeatable)")
    args = parser.parse_args(argv)
    try:
        objects = render(args.overlay)
        if args.command == "render":
            yaml.dump_all(objects, sys.stdout, Dumper=_BlockDumper, sort_keys=False)
            return 0
        root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="medtvt-local-"))
        root.mkdir(parents=True, exist_ok=True)
        processes = local_commands(objects, root.resolve(), dict(args.port), args.binary,
                                   args.auth_token, args.otlp_endpoint, dict(args.env))
        json.dump(processes, sys.stdout, indent=2)
        print()
        return 0
    except RenderError as err:
        print(f"render.py: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
