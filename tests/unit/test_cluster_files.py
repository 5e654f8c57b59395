"""The cluster files under cluster/ hold together, checked offline: every YAML parses; the Ray
cluster launcher config passes the installed Ray's schema and its own config checks, with sane
node types and a GPU type that declares its GPU; the KubeRay manifests use ray.io/v1, token auth
and images of the installed Ray version; the runtime_envs are valid and keep .venv and runs/ out
of the upload; every job file and `orchestrator` command they name exists and validates;
local_head.sh is valid bash and, run against a stub `ray`, starts the head with token auth and
fails loudly; nothing under cluster/ turns auth off or looks like a secret. No network, no Ray
started (importing ray starts nothing)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.runtime_env import RuntimeEnv

from orchestrator import cli
from orchestrator.config.loader import load_job
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
KUBERAY = CLUSTER / "kuberay"
LOCAL_HEAD = CLUSTER / "local_head.sh"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
RAY_VERSION = ray.__version__
RAY_KINDS = ("RayCluster", "RayJob")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def test_cluster_files_exist() -> None:
    for name in (
        "ray-cluster.yaml",
        "runtime_env.yaml",
        "local_head.sh",
        "README.md",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/Dockerfile",
    ):
        assert (CLUSTER / name).is_file(), f"cluster/{name} is missing"


@pytest.mark.parametrize("path", YAMLS, ids=[_rel(p) for p in YAMLS])
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{_rel(path)}: no mapping documents"


# --- Ray cluster launcher (`ray up`) ------------------------------------------------------------


def launcher_problems(cfg: dict) -> list[str]:
    """Everything wrong with a launcher config, as `ray up` and a reader would see it."""
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    problems = [
        f"schema: {'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)
    ]
    if problems:
        return problems
    # What `ray up` runs before launching anything: defaults filled in, then its own checks
    # (head type listed, global max_workers >= the sum of min_workers). Private but pinned (<2.61).
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as e:  # ValueError / ValidationError, with Ray's message
        problems.append(f"ray validate_config: {e}")
    types = cfg.get("available_node_types", {})
    head = cfg.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type {head!r} is not in available_node_types")
    workers = {k: v for k, v in types.items() if k != head}
    if not workers:
        problems.append("no worker node types")
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if hi is None or not 0 <= lo <= hi <= cfg.get("max_workers", 0):
            problems.append(f"{name}: need 0 <= min_workers <= max_workers <= global max_workers")
    gpu_types = [k for k, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    for name, t in types.items():
        instance = str(t.get("node_config", {}).get("InstanceType", ""))
        looks_gpu = "gpu" in name.lower() or re.match(r"(g\d|p\d)", instance)
        if looks_gpu and t["resources"].get("GPU", 0) < 1:
            problems.append(f"{name} ({instance}) is a GPU node type but declares no GPU resource")
    if not gpu_types:
        problems.append("no worker node type declares a GPU")
    if len(gpu_types) == len(workers):
        problems.append("no CPU-only worker node type")
    return problems


def test_launcher_config_is_valid() -> None:
    cfg = _docs(LAUNCHER)[0]
    assert launcher_problems(cfg) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda c: c.update(max_workers="six"), "schema"),
        (lambda c: c.update(worker_count=3), "schema"),  # not a launcher key
        (lambda c: c["available_node_types"]["ray.worker.cpu"].pop("node_config"), "schema"),
        (lambda c: c.update(head_node_type="ray.head.missing"), "head_node_type"),
        (
            lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=5),
            "min_workers",
        ),
        (lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].pop("GPU"), "GPU"),
    ],
    ids=["wrong-type", "unknown-key", "no-node-config", "bad-head", "min-over-max", "gpu-no-gpu"],
)
def test_launcher_check_catches_a_broken_copy(tmp_path: Path, breakage, expected: str) -> None:
    broken = tmp_path / "ray-cluster.yaml"
    shutil.copy(LAUNCHER, broken)
    cfg = _docs(broken)[0]
    breakage(cfg)
    broken.write_text(yaml.safe_dump(cfg))
    problems = launcher_problems(_docs(broken)[0])
    assert any(expected in p for p in problems), problems


def test_launcher_installs_the_project_and_shares_the_token() -> None:
    cfg = _docs(LAUNCHER)[0]
    mounts = cfg["file_mounts"]
    assert mounts.get("~/orchestrator") == ".", "the repository is mounted at ~/orchestrator"
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token", "every node gets the token"
    assert ".gitignore" in cfg.get("rsync_filter", []), ".venv and runs/ must not be synced"
    setup = " ".join(cfg["setup_commands"])
    assert "scripts/setup.sh" in setup and (REPO / "scripts/setup.sh").is_file()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key


# --- KubeRay ------------------------------------------------------------------------------------

KUBE_DOCS = [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]
RAY_DOCS = [(p, d) for p, d in KUBE_DOCS if d.get("kind") in RAY_KINDS]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _min_python() -> tuple[int, int]:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'requires-python\s*=\s*">=\s*3\.(\d+)"', text)
    assert m, "pyproject.toml: requires-python >=3.N not found"
    return 3, int(m.group(1))


def image_problems(image: str) -> list[str]:
    """An image must name the installed Ray version and a Python the project supports."""
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    problems = []
    versions = re.findall(r"(?<![\d.])(\d+\.\d+\.\d+)(?![\d.])", tag)
    if not versions or set(versions) != {RAY_VERSION}:
        problems.append(f"{image}: tag must name Ray {RAY_VERSION}")
    py = re.search(r"py3(\d+)", tag)
    if not py or (3, int(py.group(1))) < _min_python():
        problems.append(f"{image}: tag must name a Python >= {'.'.join(map(str, _min_python()))}")
    return problems


def test_kuberay_files_hold_a_raycluster_and_a_rayjob() -> None:
    kinds = {(p.name, d["kind"]) for p, d in RAY_DOCS}
    assert ("raycluster.yaml", "RayCluster") in kinds
    assert ("rayjob.yaml", "RayJob") in kinds


@pytest.mark.parametrize(
    ("path", "doc"), RAY_DOCS, ids=[f"{p.name}:{d['kind']}" for p, d in RAY_DOCS]
)
def test_kuberay_manifest(path: Path, doc: dict) -> None:
    assert doc["apiVersion"] == "ray.io/v1"
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec.get("authOptions", {}).get("mode") == "token", "token auth must be on"
    for c in _containers(spec):
        assert image_problems(c["image"]) == []
    groups = spec["workerGroupSpecs"]
    for g in groups:
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g["maxReplicas"]
        assert 0 <= lo <= n <= hi, f"{g['groupName']}: need minReplicas <= replicas <= maxReplicas"
    gpu_groups = [
        g
        for g in groups
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "a worker group with nvidia.com/gpu limits"
    assert len(gpu_groups) < len(groups), "a CPU worker group"
    for g in gpu_groups:
        assert all(
            image_problems(c["image"]) == [] and c["image"].endswith("-gpu")
            for c in g["template"]["spec"]["containers"]
        ), "GPU pods run the -gpu image"


def test_image_check_catches_other_versions() -> None:
    assert image_problems(f"orchestrator:ray{RAY_VERSION}-py311") == []
    assert image_problems("rayproject/ray:2.59.0-py311")
    assert image_problems(f"rayproject/ray:{RAY_VERSION}-py38")
    assert image_problems("rayproject/ray:latest")


def test_rayjob_submits_with_a_valid_runtime_env() -> None:
    (doc,) = [d for p, d in RAY_DOCS if d["kind"] == "RayJob"]
    spec = doc["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].startswith("orchestrator ")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    # working_dir is a path inside the image (the submitter pod runs the head's image): the one
    # the Dockerfile copies the project to. Ray checks a local working_dir exists, so validate
    # the rest against this checkout.
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    copied_to = re.search(r"^COPY\s+(?:--\S+\s+)*\.\s+(\S+)", dockerfile, re.M)
    assert copied_to and env["working_dir"] == copied_to.group(1)
    RuntimeEnv(**{**env, "working_dir": str(REPO)})


def test_dockerfile_builds_from_the_installed_ray() -> None:
    text = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)", text, re.M)
    assert base and base.group(1).startswith("rayproject/ray:"), "ARG BASE=rayproject/ray:..."
    assert image_problems(base.group(1)) == []
    assert "scripts/setup.sh" in text


def test_every_rayproject_image_named_under_cluster_is_the_installed_version() -> None:
    for path in FILES:
        for image in re.findall(r"rayproject/ray:[\w.-]+", path.read_text(encoding="utf-8")):
            assert image_problems(image) == [], f"{_rel(path)}: {image}"


# --- runtime_env for `ray job submit` -----------------------------------------------------------


def upload_problems(env: dict, root: Path) -> list[str]:
    """What Ray would upload of `root` under env's excludes alone (.gitignore not counted)."""
    from ray._private.runtime_env.packaging import (  # Ray's own matcher and walk; pinned <2.61
        GCS_STORAGE_MAX_SIZE,
        _dir_travel,
        _get_excludes,
    )

    problems = []
    uploaded: list[Path] = []
    excludes = [_get_excludes(root, env.get("excludes", []))]
    _dir_travel(root, excludes, uploaded.append, include_gitignore=False)
    names = {p.relative_to(root).parts[0] for p in uploaded if p.is_file()}
    for big in (".venv", "runs", ".git"):
        if (root / big).exists() and big in names:
            problems.append(f"{big}/ would be uploaded")
    size = sum(p.stat().st_size for p in uploaded if p.is_file())
    if size >= GCS_STORAGE_MAX_SIZE:
        problems.append(f"upload of {size / 2**20:.0f} MiB is over Ray's limit")
    return problems


def test_runtime_env_is_valid_and_keeps_big_folders_out(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _docs(CLUSTER / "runtime_env.yaml")[0]
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    monkeypatch.chdir(REPO)  # working_dir "." is the repository root, where it is submitted from
    RuntimeEnv(**env)
    assert upload_problems(env, REPO) == []


def test_upload_check_catches_missing_excludes(tmp_path: Path) -> None:
    for folder in (".venv/lib", "runs/x", "orchestrator"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "f.txt").write_text("x")
    env = _docs(CLUSTER / "runtime_env.yaml")[0]
    assert upload_problems(env, tmp_path) == []
    problems = upload_problems({**env, "excludes": [".git/"]}, tmp_path)
    assert any(".venv" in p for p in problems) and any("runs" in p for p in problems)


# --- job files and `orchestrator` commands named under cluster/ ---------------------------------

# "jobs/...yaml" as a path of its own or the tail of one (/home/ray/orchestrator/jobs/x.yaml).
JOB_PATH = re.compile(r"(?<![\w.-])(jobs/[\w/.-]+?\.ya?ml)(?![\w-])")
COMMAND = re.compile(r"\borchestrator[ \t]+([a-z][\w-]*)[ \t]+([^\s;|&)]+)((?:[ \t]+[^\s;|&)]+)*)")
JOB_COMMANDS = ("validate", "train", "compress", "search")


def command_problems(text: str, source: str) -> list[str]:
    """Every `jobs/...yaml` named must exist and load; every `orchestrator SUB ARG ...` must use a
    real subcommand, and a job command's job file must load with the overrides given."""
    problems = []
    for m in JOB_PATH.finditer(text):
        if not (REPO / m.group(1)).is_file():
            problems.append(f"{source}: {m.group(1)} does not exist")
    for m in COMMAND.finditer(text):
        sub, first = m.group(1), m.group(2).strip("'\"`")
        if not re.search(r"\w/\w|\.ya?ml$", first):
            continue  # prose ("orchestrator refuses a job ..."), not a command line
        if cli.main([sub, "--help"]) != 0:  # argparse: 0 for a real subcommand, 2 otherwise
            problems.append(f"{source}: `orchestrator {sub}` is not a subcommand")
            continue
        if sub not in JOB_COMMANDS:
            continue
        job = JOB_PATH.search(first)
        if not job:
            problems.append(f"{source}: `orchestrator {sub} {first}` names no jobs/... file")
            continue
        words = [w.strip("'\"`") for w in m.group(3).split()]
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        try:
            load_job(REPO / job.group(1), overrides)
        except (ConfigError, OSError) as e:
            problems.append(f"{source}: {job.group(1)} {' '.join(overrides)}: {e}")
    return problems


@pytest.mark.parametrize("path", FILES, ids=[_rel(p) for p in FILES])
def test_named_jobs_and_commands_are_real(path: Path, capsys: pytest.CaptureFixture) -> None:
    assert command_problems(path.read_text(encoding="utf-8"), _rel(path)) == []


def test_the_files_name_jobs_and_commands() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in FILES)
    assert JOB_PATH.search(text) and COMMAND.search(text), "the checks above would check nothing"
    (job,) = [d for _, d in RAY_DOCS if d["kind"] == "RayJob"]
    assert COMMAND.search(job["spec"]["entrypoint"]), (
        "the RayJob entrypoint is an orchestrator command"
    )


def test_command_check_catches_broken_references(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "entrypoint: orchestrator search jobs/no_such_job.yaml\n"
        "# run: orchestrator serach jobs/quickstart.yaml\n"
        "# run: orchestrator search jobs/quickstart.yaml train.lrr=3\n"
        "# then: orchestrator report runs/quickstart\n"  # fine: a run directory, not a job
    )
    problems = command_problems(broken.read_text(), "broken.yaml")
    assert len(problems) == 4, problems  # the missing file (as a path and as a command's job)
    assert any("serach" in p for p in problems)
    assert any("train.lrr" in p for p in problems)


# --- local_head.sh ------------------------------------------------------------------------------


def test_local_head_script_is_valid_bash() -> None:
    run = subprocess.run(["bash", "-n", str(LOCAL_HEAD)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_local_head_script_passes_shellcheck() -> None:
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    run = subprocess.run(["shellcheck", str(LOCAL_HEAD)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


STUB_RAY = """#!/usr/bin/env bash
# Stands in for `ray`: records each call with the RAY_AUTH_MODE it saw, starts nothing.
echo "RAY_AUTH_MODE=${RAY_AUTH_MODE:-} $*" >> "$STUB_LOG"
if [ "$1" = start ]; then exit "${STUB_START_RC:-0}"; fi
exit 0
"""


@pytest.fixture
def head(tmp_path: Path):
    """Runs a copy of local_head.sh whose `ray` is a stub: outside the repository, so that no
    .venv/bin/ray is found, and with the stub first on PATH."""
    (tmp_path / "cluster").mkdir()
    script = tmp_path / "cluster" / "local_head.sh"
    shutil.copy(LOCAL_HEAD, script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(STUB_RAY)
    (bin_dir / "ray").chmod(0o755)
    log = tmp_path / "ray-calls.log"

    def run(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "STUB_LOG": str(log),
            **env,
        }
        proc = subprocess.run(
            ["bash", str(script), *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=60,
        )
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)  # each run reports only its own calls
        return proc, calls

    return run


def test_local_head_start_turns_token_auth_on(head) -> None:
    proc, calls = head(
        "start",
        RAY_PORT="6390",
        RAY_NUM_CPUS="2",
        RAY_DASHBOARD_PORT="8270",
        RAY_AUTH_MODE="disabled",  # the caller's environment cannot turn auth off
    )
    assert proc.returncode == 0, proc.stderr
    assert calls[0].endswith("get-auth-token --generate"), calls
    start = shlex.split(calls[1])
    assert start[0] == "RAY_AUTH_MODE=token" and start[1:3] == ["start", "--head"], calls
    for flag, value in (
        ("--port", "6390"),
        ("--num-cpus", "2"),
        ("--dashboard-host", "127.0.0.1"),
        ("--dashboard-port", "8270"),
    ):
        assert start[start.index(flag) + 1] == value, calls
    assert "export RAY_ADDRESS=127.0.0.1:6390" in proc.stdout  # no Ray ran: the fallback address
    assert "export RAY_AUTH_MODE=token" in proc.stdout
    assert "http://127.0.0.1:8270" in proc.stdout


def test_local_head_fails_loudly(head) -> None:
    proc, calls = head("start", STUB_START_RC="1")
    assert proc.returncode != 0 and "ray start failed" in proc.stderr
    proc, calls = head("start", RAY_PORT="63x9")
    assert proc.returncode != 0 and "RAY_PORT" in proc.stderr
    assert calls == [], "a bad setting stops the script before it calls ray"
    proc, _ = head()
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_local_head_stop_and_status(head) -> None:
    proc, calls = head("stop")
    assert proc.returncode == 0 and calls[-1].endswith(" stop"), calls
    proc, calls = head("status")
    assert proc.returncode == 0 and calls[-1] == "RAY_AUTH_MODE=token status", calls


def test_local_head_without_ray(tmp_path: Path) -> None:
    path = "/usr/bin:/bin"
    if shutil.which("ray", path=path):
        pytest.skip("a system-wide ray is installed")
    (tmp_path / "cluster").mkdir()
    shutil.copy(LOCAL_HEAD, tmp_path / "cluster" / "local_head.sh")
    proc = subprocess.run(
        ["bash", str(tmp_path / "cluster" / "local_head.sh"), "start"],
        capture_output=True,
        text=True,
        env={"PATH": path, "HOME": str(tmp_path)},
        timeout=60,
    )
    assert proc.returncode == 1 and "no Ray found" in proc.stderr


# --- nothing that turns auth off or looks like a secret -----------------------------------------

FORBIDDEN = {
    "auth turned off": re.compile(
        r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled|mode:\s*[\"']?disabled", re.I
    ),
    "AWS key name": re.compile(r"aws_(access_key_id|secret_access_key|session_token)", re.I),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS account id": re.compile(r"arn:aws:[\w-]*:[\w-]*:\d{12}:|\b\d{12}\b"),
    "literal Ray token": re.compile(
        r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?[A-Za-z0-9+/_-]{16,}|auth_token:\s*[\"']?[A-Za-z0-9+/_-]{16,}"
    ),
    "password": re.compile(r"password\s*[=:]\s*\S", re.I),
}


def secret_problems(text: str, source: str) -> list[str]:
    return [f"{source}: {what}" for what, pattern in FORBIDDEN.items() if pattern.search(text)]


@pytest.mark.parametrize("path", FILES, ids=[_rel(p) for p in FILES])
def test_no_disabled_auth_and_no_secrets(path: Path) -> None:
    assert secret_problems(path.read_text(encoding="utf-8"), _rel(path)) == []


def test_secret_check_catches_them() -> None:
    # Built from pieces so that this file itself holds nothing a scanner would flag.
    samples = {
        "auth turned off": "env: RAY_AUTH_MODE=" + "disabled",
        "AWS key name": "aws_" + "access_key_id = x",
        "AWS access key id": "AKIA" + "Q" * 16,
        "private key": "-----BEGIN RSA " + "PRIVATE KEY-----",
        "AWS account id": "arn:aws:iam::" + "1" * 12 + ":role/x",
        "literal Ray token": "RAY_AUTH_TOKEN=" + "a1" * 16,
    }
    for what, text in samples.items():
        assert secret_problems(text, "x") == [f"x: {what}"], what
