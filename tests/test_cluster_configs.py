"""cluster/ holds what people deploy: its properties are checked here, against the installed
Ray, MLflow and KubeRay conventions rather than by eye.

- Every config renders (cluster/render.py fills the site values) and parses; the launcher config
  passes Ray's own schema; every `ray start` and `mlflow server` flag exists in the pinned CLIs.
- Security: token authentication everywhere, no dashboard/GCS/client/MLflow port on a public
  interface, no LoadBalancer/NodePort, no 0.0.0.0/0, no keys or default passwords, secrets only
  through Secret references, non-root images, pinned image tags equal to the lock's versions.
- Shapes: requests == limits, the GPU group has GPUs, the decode group has none, the head takes
  no tasks, and the RayJob entrypoint is a valid `resnet-train` command line.
- Code: no unsafe deserialization in resnet_core/, pipelines/, cluster/ (AST scan), and the
  lock's torch/ray/mlflow/pyarrow/pillow are at or above the versions that fix known CVEs.
- cluster/fetch_token.py against a real Secrets Manager API on loopback (moto).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

from cluster import fetch_token, render
from pipelines.job.session import free_loopback_port

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SITE = {"AWS_ACCOUNT_ID": "123456789012", "AWS_REGION": "us-west-2", "BUCKET": "resnet-ray-test"}
K8S_FILES = [
    "kuberay/common.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    "mlflow/tracking-server.yaml",
    "mlflow/postgres.yaml",
]
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


def rendered(name: str) -> str:
    return render.render((CLUSTER / name).read_text(), SITE)


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered(name)) if d]


def k8s_objects() -> list[tuple[str, dict]]:
    return [(name, doc) for name in K8S_FILES for doc in documents(name)]


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of a RayCluster/RayJob (head + worker groups) or a workload."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    if obj["kind"] in ("RayCluster", "RayJob"):
        groups = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec["workerGroupSpecs"]
        ]
        return [(name, g["template"]["spec"]) for name, g in groups]
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [(obj["metadata"]["name"], spec["template"]["spec"])]
    return []


def ray_clusters() -> list[tuple[str, dict]]:
    """(file, RayClusterSpec) of every KubeRay object."""
    found = []
    for name, obj in k8s_objects():
        if obj["kind"] == "RayCluster":
            found.append((name, obj["spec"]))
        elif obj["kind"] == "RayJob":
            found.append((name, obj["spec"]["rayClusterSpec"]))
    return found


def aws_config() -> dict:
    return yaml.safe_load(rendered("aws.yaml"))


def flags(command: str) -> list[str]:
    """The ``--flag`` names of a shell command line (``--a=b`` and ``--a b`` alike)."""
    return [word.split("=", 1)[0] for word in shlex.split(command) if word.startswith("--")]


def ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {opt for param in start.params for opt in param.opts}


def mlflow_server_options() -> set[str]:
    from mlflow.cli import server

    return {opt for param in server.params for opt in param.opts}


# ---------------------------------------------------------------------------------------------
# cluster/render.py
# ---------------------------------------------------------------------------------------------


def test_render_fills_only_site_values():
    text = "image: ${AWS_ACCOUNT_ID}.dkr\nip: $RAY_HEAD_IP\narg: $(MLFLOW_URI)\nb: s3://${BUCKET}"
    out = render.render(text, SITE)
    assert (
        out
        == "image: 123456789012.dkr\nip: $RAY_HEAD_IP\narg: $(MLFLOW_URI)\nb: s3://resnet-ray-test"
    )


@pytest.mark.parametrize(
    ("text", "values", "message"),
    [
        ("${BUCKET}", {}, "BUCKET is not set: export BUCKET="),
        ("${BUCKET}", {"BUCKET": "s3://x"}, "BUCKET='s3://x' is not a valid S3 bucket name"),
        ("${AWS_REGION}", {"AWS_REGION": "west"}, "AWS_REGION='west' is not a valid AWS region"),
        ("${AWS_ACCOUNT_ID}", {"AWS_ACCOUNT_ID": "12"}, "AWS_ACCOUNT_ID='12' is not a valid"),
        ("${HOME}", SITE, "${HOME} is not a site value"),
    ],
)
def test_render_refuses_missing_malformed_or_unknown_values(text, values, message):
    with pytest.raises(render.RenderError, match=re.escape(message)):
        render.render(text, values)


def test_render_command_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "x.yaml"
    path.write_text("bucket: ${BUCKET}\n")
    monkeypatch.delenv("BUCKET", raising=False)
    assert render.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "BUCKET is not set" in err
    monkeypatch.setenv("BUCKET", "my-bucket")
    assert render.main([str(path)]) == 0
    assert capsys.readouterr().out == "bucket: my-bucket\n"


def test_every_cluster_file_names_only_site_values_and_parses():
    files = [p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".json")]
    assert len(files) >= 10, files
    for path in files:
        name = str(path.relative_to(CLUSTER))
        assert render.referenced_names(path.read_text()) <= set(render.SITE_VALUES), name
        text = rendered(name)
        assert "${" not in text, name
        parsed = json.loads(text) if path.suffix == ".json" else list(yaml.safe_load_all(text))
        assert parsed, name


# ---------------------------------------------------------------------------------------------
# AWS: cluster/aws.yaml and the IAM policies
# ---------------------------------------------------------------------------------------------


def test_aws_config_passes_the_ray_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(aws_config())
    validate_config(config)
    assert set(config["available_node_types"]) == {"head", "gpu", "decode"}


def test_aws_every_node_starts_with_token_auth_and_the_token_from_secrets_manager():
    config = aws_config()
    starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    starts += [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command, command
    # Fetched at setup on every node (no node type overrides setup_commands), into Ray's
    # default token path, with the instance role: no token in the config itself.
    (setup,) = config["setup_commands"]
    argv = shlex.split(setup)
    assert argv[:3] == ["python", "-m", "cluster.fetch_token"]
    assert argv[argv.index("--out") + 1] == "~/.ray/auth_token"
    assert argv[argv.index("--region") + 1] == config["provider"]["region"]
    for node_type in config["available_node_types"].values():
        assert "setup_commands" not in node_type


def test_aws_nothing_listens_publicly_and_nodes_stay_private():
    config = aws_config()
    assert "0.0.0.0" not in yaml.safe_dump(config)  # no bind address, no open CIDR
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    (mlflow_start,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert "--host 127.0.0.1" in mlflow_start
    assert config["provider"]["use_internal_ips"] is True
    # The launcher only adds its SSH-from-anywhere rule to a group it creates; ours is named,
    # pre-created (README) and the config adds no ingress rule of its own.
    assert config["provider"]["security_group"] == {"GroupName": "resnet-ray"}
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert node["MetadataOptions"]["HttpTokens"] == "required", name  # IMDSv2 only
        assert all(d["Ebs"]["Encrypted"] for d in node["BlockDeviceMappings"]), name
        assert set(node["IamInstanceProfile"]) == {"Name"}, name  # a role, never keys


def test_aws_node_shapes():
    config = aws_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--num-cpus=0" in head_start
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is on-demand
    gpu, decode = types["gpu"], types["decode"]
    assert re.match(r"p[45]", gpu["node_config"]["InstanceType"])  # 8-GPU A100/H100 nodes
    assert re.match(r"[cm]\d", decode["node_config"]["InstanceType"])  # CPU only
    for node_type in (gpu, decode):
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert 0 <= node_type["min_workers"] < node_type["max_workers"]
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    assert {t["labels"]["resnet-ray/role"] for t in (gpu, decode)} == {"train", "decode"}
    for node_type in (gpu, decode):
        validate_node_labels(node_type["labels"])
        validate_node_label_syntax(node_type["labels"])


def test_aws_commands_use_only_existing_flags_and_the_pinned_image():
    config = aws_config()
    ray_options, mlflow_options = ray_start_options(), mlflow_server_options()
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            start = command[command.index("ray start") :]
            assert set(flags(start)) <= ray_options, command
        if "mlflow server" in command:
            server = command[command.index("mlflow server") : command.index(">>")]
            assert set(flags(server)) <= mlflow_options, command
    image = config["docker"]["image"]
    assert image == f"123456789012.dkr.ecr.us-west-2.amazonaws.com/resnet-ray:{project_version()}"
    for commands in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in config[commands])  # the image is complete


def test_iam_policies_grant_only_what_the_nodes_use():
    names = sorted(p.name for p in (CLUSTER / "aws-iam").glob("*.json"))
    assert names == [
        "head-policy.json",
        "mlflow-policy.json",
        "pods-policy.json",
        "worker-policy.json",
    ]
    for name in names:
        policy = json.loads(rendered(f"aws-iam/{name}"))
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow"
            actions = statement["Action"]
            actions = [actions] if isinstance(actions, str) else actions
            assert not any(a == "*" or a.endswith(":*") for a in actions), (name, actions)
            resource = statement["Resource"]
            if any(a.startswith("s3:") for a in actions):
                assert resource.startswith("arn:aws:s3:::resnet-ray-test"), (name, resource)
            if resource == "*":
                # Only calls AWS cannot scope to a resource (ECR login, EC2 launch/describe).
                assert all(a.startswith(("ecr:GetAuthorization", "ec2:")) for a in actions)
            if any(a in ("ec2:TerminateInstances", "ec2:StopInstances") for a in actions):
                condition = statement["Condition"]["StringEquals"]
                assert condition == {"ec2:ResourceTag/ray-cluster-name": "resnet-ray"}
            if "iam:PassRole" in actions:
                assert resource.endswith(":role/resnet-ray-worker")


# ---------------------------------------------------------------------------------------------
# Kubernetes: KubeRay and the MLflow server
# ---------------------------------------------------------------------------------------------


def test_kuberay_clusters_pin_ray_and_require_token_auth():
    ray_version = lock_versions()["ray"]
    clusters = ray_clusters()
    assert {name for name, _ in clusters} == {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml"}
    for name, spec in clusters:
        assert spec["rayVersion"] == ray_version, name
        assert spec["authOptions"] == {"mode": "token"}, name
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        ray_options = ray_start_options()
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            assert {f"--{key}" for key in group["rayStartParams"]} <= ray_options, name


def test_no_public_service_and_no_public_dashboard():
    for name, obj in k8s_objects():
        if obj["kind"] == "Service":
            assert obj["spec"]["type"] == "ClusterIP", (name, obj["metadata"]["name"])
        assert obj["kind"] != "Ingress", name
    for name, spec in ray_clusters():
        host = spec["headGroupSpec"]["rayStartParams"]["dashboard-host"]
        # A long-lived cluster keeps its Jobs API on the head's loopback (port-forward). A
        # RayJob's submitter and the operator need it on the pod network: allowed only
        # because the pod network is private, the Service is ClusterIP and the NetworkPolicy
        # of common.yaml admits only this namespace and the operator (checked below).
        assert host == ("0.0.0.0" if name == "kuberay/rayjob.yaml" else "127.0.0.1"), name
    (policy,) = [
        o for n, o in k8s_objects() if o["kind"] == "NetworkPolicy" and n.startswith("kuberay")
    ]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    same_namespace, operator = policy["spec"]["ingress"]
    assert same_namespace == {"from": [{"podSelector": {}}]}
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert "namespaceSelector" in operator["from"][0]


def test_every_container_has_requests_equal_limits_and_runs_unprivileged():
    containers = 0
    for name, obj in k8s_objects():
        for group, pod in pod_specs(obj):
            assert pod["securityContext"]["runAsNonRoot"] is True, (name, group)
            assert pod["securityContext"]["runAsUser"] != 0, (name, group)
            for container in pod["containers"]:
                containers += 1
                resources = container["resources"]
                assert resources["requests"] == resources["limits"], (name, group)
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert containers == 8
    for name, spec in ray_clusters():
        autoscaler = spec.get("autoscalerOptions", {}).get("resources")
        if autoscaler:
            assert autoscaler["requests"] == autoscaler["limits"], name


def test_gpu_group_has_gpus_and_decode_group_has_none():
    for name, spec in ray_clusters():
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"gpu", "decode"}, name
        (gpu,) = groups["gpu"]["template"]["spec"]["containers"]
        (decode,) = groups["decode"]["template"]["spec"]["containers"]
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "8", name
        assert "nvidia.com/gpu" not in decode["resources"]["limits"], name
        assert groups["gpu"]["rayStartParams"]["labels"] == "resnet-ray/role=train"
        assert groups["decode"]["rayStartParams"]["labels"] == "resnet-ray/role=decode"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], name


def test_images_are_pinned_to_the_project_and_lock_versions():
    expected = {
        "resnet-ray": project_version(),
        "resnet-ray-mlflow": lock_versions()["mlflow"],
        "postgres": "17.6-bookworm",
    }
    seen = set()
    for name, obj in k8s_objects():
        for group, pod in pod_specs(obj):
            for container in pod["containers"]:
                repository, _, tag = container["image"].rpartition(":")
                short = repository.rpartition("/")[2]
                assert tag == expected[short], (name, group, container["image"])
                seen.add(short)
    assert seen == set(expected)


def test_secrets_reach_pods_only_as_secret_references():
    for name, obj in k8s_objects():
        for group, pod in pod_specs(obj):
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]) or env["name"].endswith("_STORE_URI"):
                        assert "value" not in env, (name, group, env["name"])
                        assert "secretKeyRef" in env["valueFrom"], (name, group, env["name"])
    for name, obj in k8s_objects():
        assert obj["kind"] != "Secret", f"{name}: Secrets are created by hand, never committed"


def test_pods_use_a_role_for_s3():
    accounts = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o
        for _, o in k8s_objects()
        if o["kind"] == "ServiceAccount"
    }
    for name, obj in k8s_objects():
        namespace = obj["metadata"].get("namespace")
        for group, pod in pod_specs(obj):
            if "serviceAccountName" not in pod:
                assert pod.get("automountServiceAccountToken") is False, (name, group)
                continue
            account = accounts[(namespace, pod["serviceAccountName"])]
            role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            assert role.startswith("arn:aws:iam::123456789012:role/resnet-ray-"), (name, group)


def test_rayjob_entrypoint_is_a_valid_training_command():
    from pipelines import train
    from pipelines.config import validate

    (rayjob,) = [o for _, o in k8s_objects() if o["kind"] == "RayJob"]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.train"]
    args = train.build_parser().parse_args(argv[3:])
    config = train.config_from_args(args)
    validate(config)
    assert config.recipe == "imagenet-fast"
    assert config.model.name == "resnet50"
    assert config.scale.use_gpu
    assert config.scale.num_workers == 8  # one 8-GPU worker pod
    assert config.data.uri == "s3://resnet-ray-test/imagenet"
    assert config.run.storage_path.startswith("s3://resnet-ray-test/")
    assert config.run.name  # fixed, so a retried job resumes the same run
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert not any(SECRET_NAME.search(k) for k in runtime_env.get("env_vars", {}))


def test_mlflow_server_is_authenticated_private_and_proxies_artifacts():
    (deployment,) = [o for _, o in k8s_objects() if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert {a.split("=", 1)[0] for a in args} <= mlflow_server_options()
    assert "--app-name=basic-auth" in args
    assert "--serve-artifacts" in args
    assert "--artifacts-destination=s3://resnet-ray-test/mlartifacts" in args
    assert not any(a.startswith("--backend-store-uri") for a in args)  # from the Secret
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert "*" not in allowed.split(",")
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert (
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    )
    config_map = next(o for _, o in k8s_objects() if o["kind"] == "ConfigMap")
    auth_ini = config_map["data"]["basic_auth.ini"]
    assert "admin_password" not in auth_ini
    policies = {o["metadata"]["name"]: o for _, o in k8s_objects() if o["kind"] == "NetworkPolicy"}
    (rule,) = policies["mlflow"]["spec"]["ingress"]
    selector = rule["from"][0]["namespaceSelector"]["matchLabels"]
    assert selector == {"kubernetes.io/metadata.name": "resnet-ray"}
    (db_rule,) = policies["mlflow-postgres"]["spec"]["ingress"]
    assert db_rule["from"] == [{"podSelector": {"matchLabels": {"app": "mlflow"}}}]


# ---------------------------------------------------------------------------------------------
# Images, runtime env
# ---------------------------------------------------------------------------------------------


def test_dockerfile_builds_on_the_pinned_ray_and_runs_as_non_root():
    text = (CLUSTER / "Dockerfile").read_text()
    lock = lock_versions()
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+|cpu)", base)
    assert match, base
    assert match.group(1) == lock["ray"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[default,data,train,tune]=={lock["ray"]}"' in pyproject
    assert f"'{lock['ray']}'" in text  # the build re-checks the installed Ray
    assert f"{match.group(2)}.{match.group(3)}" == "3.11"  # the lock is resolved for 3.11
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")
    assert "pip install --no-cache-dir --no-deps -r requirements.lock" in text
    secret_setting = rf"^(ENV|ARG) .*({SECRET_NAME.pattern})"
    assert not re.search(secret_setting, text, re.MULTILINE | re.IGNORECASE)
    ignore = [
        line
        for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # deny by default, then allow only the code and the pins
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    assert allowed == {"requirements.lock", "pyproject.toml", "README.md"} | {
        "resnet_core",
        "pipelines",
        "cluster",
    }


def test_mlflow_image_pins_the_locked_mlflow():
    text = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow=={lock_versions()['mlflow']}" in text
    assert "-c /tmp/requirements.lock" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0")


def test_runtime_env_uploads_the_code_only(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    assert not any(SECRET_NAME.search(k) for k in runtime_env["env_vars"])
    assert "MLFLOW_TRACKING_URI" not in runtime_env["env_vars"]  # set on the cluster
    checkout = tmp_path / "checkout"
    kept = ["pipelines/train.py", "resnet_core/models.py", "pyproject.toml", "cluster/aws.yaml"]
    dropped = [
        ".git/HEAD", ".venv/bin/python", "data/cifar10/manifest.json", "results/run/ckpt.json",
        "mlruns/0/meta.yaml", "mlflow.db", "mlartifacts/1/model.pt2", "shard-000.parquet",
        "pipelines/__pycache__/train.cpython-311.pyc", "ray_results/x.json",
    ]  # fmt: skip
    for relative in kept + dropped:
        (checkout / relative).parent.mkdir(parents=True, exist_ok=True)
        (checkout / relative).write_text("x")
    package = tmp_path / "package.zip"
    # Without .gitignore: the runtime env's excludes alone must keep these out.
    create_package(
        str(checkout), package, include_gitignore=False, excludes=runtime_env["excludes"]
    )
    with zipfile.ZipFile(package) as z:
        names = {n for n in z.namelist() if not n.endswith("/")}
    assert names == set(kept)


# ---------------------------------------------------------------------------------------------
# No keys, no default passwords, no unsafe deserialization, no known-vulnerable pins
# ---------------------------------------------------------------------------------------------


def test_no_credentials_anywhere_in_cluster():
    patterns = [
        re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
        re.compile(r"aws_secret_access_key\s*[=:]", re.IGNORECASE),
        re.compile(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*\S"),
        re.compile(r"AWS_SESSION_TOKEN\s*[=:]\s*\S"),
        re.compile(r"password1234"),  # MLflow basic-auth's historical default
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    ]
    for path in sorted(
        p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    ):
        text = path.read_text()
        for pattern in patterns:
            assert not pattern.search(text), f"{path.relative_to(ROOT)}: {pattern.pattern}"


UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load",
    "cloudpickle.loads", "joblib.load", "pandas.read_pickle", "marshal.load", "marshal.loads",
    "shelve.open", "yaml.unsafe_load", "yaml.full_load", "torch.serialization.load",
}  # fmt: skip


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_restricted_unpickler(cls: ast.ClassDef) -> bool:
    """A pickle.Unpickler subclass whose find_class refuses what it does not list: it raises and
    never defers to the permissive base (super().find_class / Unpickler.find_class)."""
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    find_class = methods.get("find_class")
    if find_class is None:
        return False
    raises = any(isinstance(n, ast.Raise) for n in ast.walk(find_class))
    defers = any(
        isinstance(n, ast.Attribute) and n.attr == "find_class" for n in ast.walk(find_class)
    )
    return raises and not defers


def unsafe_deserialization(source: str) -> list[str]:
    """``line: what`` for every call that can run code from the bytes it reads."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []

    def qualified(expr: ast.AST) -> str | None:
        dotted = _dotted(expr)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        head = aliases.get(head, head)
        return f"{head}.{rest}" if rest else head

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {qualified(b) for b in node.bases}
            if "pickle.Unpickler" in bases and not _is_restricted_unpickler(node):
                found.append(f"{node.lineno}: {node.name} subclasses pickle.Unpickler unrestricted")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = qualified(node.func)
        if name in UNSAFE_CALLS:
            found.append(f"{node.lineno}: {name}")
        elif name == "torch.load":
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif name == "numpy.load":
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{node.lineno}: numpy.load with allow_pickle")
        elif name == "yaml.load":
            loader = _keyword(node, "Loader")
            if qualified(loader) not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
                found.append(f"{node.lineno}: yaml.load without SafeLoader")
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import pickle\npickle.loads(b)", ["2: pickle.loads"]),
        ("from pickle import load as l\nl(f)", ["2: pickle.load"]),
        ("import torch\ntorch.load(p)", ["2: torch.load without weights_only=True"]),
        (
            "import torch as t\nt.load(p, weights_only=False)",
            ["2: torch.load without weights_only=True"],
        ),
        ("import torch\ntorch.load(p, weights_only=True)", []),
        ("import numpy as np\nnp.load(p, allow_pickle=True)", ["2: numpy.load with allow_pickle"]),
        ("import numpy as np\nnp.load(p, allow_pickle=False)\nnp.load(p)", []),
        ("import yaml\nyaml.load(s)", ["2: yaml.load without SafeLoader"]),
        ("import yaml\nyaml.load(s, Loader=yaml.SafeLoader)", []),
        ("import pickle\npickle.Unpickler(f).load()", ["2: pickle.Unpickler"]),
        (
            "import pickle\nclass U(pickle.Unpickler):\n def find_class(self, m, n):\n"
            "  return super().find_class(m, n)\nU(f).load()",
            ["2: U subclasses pickle.Unpickler unrestricted"],
        ),
        (
            "import pickle\nclass U(pickle.Unpickler):\n def find_class(self, m, n):\n"
            "  if (m, n) not in OK:\n   raise pickle.UnpicklingError(m)\n  return OK[m, n]\n"
            "U(f).load()",
            [],
        ),
    ],
)
def test_the_deserialization_scan_finds_what_it_should(source, expected):
    assert unsafe_deserialization(source) == expected


def test_no_unsafe_deserialization_in_the_code():
    files = [p for d in ("resnet_core", "pipelines", "cluster") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 15
    found = {
        str(p.relative_to(ROOT)): hits
        for p in files
        if (hits := unsafe_deserialization(p.read_text()))
    }
    assert found == {}


# Minimum safe versions of the lock's security-relevant pins, and the advisories they clear.
SECURITY_FLOORS = {
    # CVE-2025-32434: torch.load(weights_only=True) could still execute code (RCE); fixed 2.6.0.
    "torch": "2.6.0",
    # CVE-2026-41486: RCE via Parquet Arrow extension-type deserialization (we read Parquet),
    # fixed 2.55.0. CVE-2026-27482: dashboard DELETE endpoints reachable from browsers (DNS
    # rebinding), fixed 2.54.0. CVE-2025-62593: Jobs API RCE through browser DNS rebinding,
    # fixed 2.52.0. CVE-2023-6019/6020/6021: dashboard command injection and file reads, 2.8.1.
    # CVE-2023-48022 ("ShadowRay", disputed): the Jobs API runs code for whoever reaches it, by
    # design; no version fixes it. Mitigation here: token auth (Ray >= 2.52) in every config
    # and the dashboard never on a public interface (checked above).
    "ray": "2.55.0",
    # CVE-2026-2614: arbitrary file read by bypassing source-path validation, fixed 3.10.0.
    # CVE-2026-2652 and CVE-2026-0545 affect <= 3.10.1 (3.12.0 is past them). Older path
    # traversals (CVE-2023-6909, CVE-2024-1483, CVE-2024-1558, CVE-2024-1594) are long fixed.
    "mlflow": "3.12.0",
    # CVE-2023-47248: arbitrary code execution when reading IPC/Parquet with extension types,
    # fixed 14.0.1 (the shards are Parquet).
    "pyarrow": "14.0.1",
    # CVE-2026-40192: FITS GZIP decompression bomb, fixed 12.2.0 (we decode untrusted images).
    # CVE-2023-50447: ImageMath.eval code execution, fixed 10.2.0.
    "pillow": "12.2.0",
}


def test_locked_versions_clear_the_known_vulnerabilities():
    lock = lock_versions()
    for name, floor in SECURITY_FLOORS.items():
        assert Version(lock[name]) >= Version(floor), f"{name}=={lock[name]} < {floor}"


# ---------------------------------------------------------------------------------------------
# cluster/fetch_token.py against Secrets Manager on loopback
# ---------------------------------------------------------------------------------------------


def test_fetch_token_writes_a_private_file_and_never_prints_it(s3_server, tmp_path, capsys):
    import boto3

    token = "f" * 64
    client = boto3.client("secretsmanager", region_name="us-east-1")
    client.create_secret(Name="resnet-ray/ray-auth-token", SecretString=token + "\n")
    out = tmp_path / "home" / ".ray" / "auth_token"
    argv = ["--secret-id", "resnet-ray/ray-auth-token", "--region", "us-east-1", "--out", str(out)]
    assert fetch_token.main(argv) == 0
    assert out.read_text() == token
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.parent.stat().st_mode & 0o777 == 0o700
    printed = capsys.readouterr()
    assert token not in printed.out + printed.err
    assert list(out.parent.iterdir()) == [out]  # no temp file left

    client.create_secret(Name="short", SecretString="tooshort-" + "x" * 10)
    client.create_secret(Name="spaces", SecretString="a b " + "x" * 40)
    for secret, message in [
        ("missing", "cannot read secret 'missing' in us-east-1 (ResourceNotFoundException)"),
        ("short", "secret 'short' is not a usable token"),
        ("spaces", "secret 'spaces' is not a usable token"),
    ]:
        bad = tmp_path / secret / "auth_token"
        assert (
            fetch_token.main(["--secret-id", secret, "--region", "us-east-1", "--out", str(bad)])
            == 2
        )
        err = capsys.readouterr().err
        assert message in err, err
        assert err.count("\n") == 1
        assert "x" * 10 not in err
        assert not bad.exists()


# ---------------------------------------------------------------------------------------------
# The MLflow server as deployed: authentication really on
# ---------------------------------------------------------------------------------------------


def _request(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> int:
    """HTTP status of a GET (or a JSON POST when ``body`` is given), with basic auth if given."""
    import base64

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    if auth:
        credentials = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {credentials}")
    try:
        # Generous: PBKDF2 password checks and first-request imports are slow on busy cores.
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_mlflow_server_with_the_deployed_flags_rejects_anonymous_and_default_passwords(tmp_path):
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (mlflow[auth])"
    )
    (deployment,) = [o for _, o in k8s_objects() if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    config_map = next(o for _, o in k8s_objects() if o["kind"] == "ConfigMap")
    port = free_loopback_port()
    # The deployed flags, with the S3 destination, the pod interface and the service port
    # swapped for local equivalents; everything else (auth app, proxying, hosts) as deployed.
    args = []
    for arg in container["args"]:
        key = arg.split("=", 1)[0]
        args.append(
            {
                "--artifacts-destination": f"--artifacts-destination={tmp_path / 'artifacts'}",
                "--host": "--host=127.0.0.1",
                "--port": f"--port={port}",
                "--workers": "--workers=1",
            }.get(key, arg)
        )
    auth_ini = config_map["data"]["basic_auth.ini"].replace(
        "sqlite:////var/lib/mlflow-auth/basic_auth.db", f"sqlite:///{tmp_path / 'auth.db'}"
    )
    (tmp_path / "basic_auth.ini").write_text(auth_ini)
    admin_password = "a-test-admin-password-" + os.urandom(8).hex()
    # What the Secrets hold in the cluster, made up here; the deployment must need no other.
    secrets_here = {
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
    }
    from_secrets = {e["name"] for e in container["env"] if "valueFrom" in e}
    assert from_secrets == set(secrets_here)
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    env.update(secrets_here)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    # Not MLflow's job runner (GenAI jobs, not what this checks): its store folder in /dev/shm
    # outlives the server.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "server", *args], env=env, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: the server forks workers
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "MLflow server did not start"
            try:
                if _request(f"{base}/health") == 200:
                    break
            except urllib.error.URLError:  # not listening yet
                pass
            time.sleep(1)
        api = f"{base}/api/2.0/mlflow"
        search = f"{api}/experiments/search?max_results=1"
        assert _request(search) == 401
        assert _request(search, ("admin", "password1234")) == 401
        assert _request(search, ("admin", admin_password)) == 200
        assert _request(f"{base}/api/2.0/mlflow-artifacts/artifacts") == 401
        # The README's set-up of the training user: the admin creates it, it can log.
        trainer = ("resnet-ray", "a-test-trainer-password-" + os.urandom(8).hex())
        create = {"username": trainer[0], "password": trainer[1]}
        assert _request(f"{api}/users/create", body=create) == 401
        assert _request(f"{api}/users/create", ("admin", admin_password), create) == 200
        assert _request(f"{api}/experiments/create", body={"name": "x"}) == 401
        assert _request(f"{api}/experiments/create", trainer, {"name": "resnet-ray"}) == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
