"""Offline checks of the deployment artefacts under deploy/ and the fleet configs they use.

- every Kubernetes manifest validates (strict) against the API schemas bundled in kubernetes-validate;
- deploy/docker-compose.yml validates against the vendored Compose Specification schema
  (tests/data/compose-spec.json, from compose-spec/compose-spec schema/compose-spec.json);
- fleet configs load with gateway.config.load_fleet and only name hosts that exist in the stack;
- the Grafana dashboard only queries metrics the gateway exports;
- the Dockerfile runs as non-root, has a HEALTHCHECK and starts `gateway serve`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.config import ConfigError, load_fleet

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).parents[1] / "data" / "compose-spec.json"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
COMPOSE_FLEET = ROOT / "config" / "compose.yaml"
K8S_FLEET = ROOT / "config" / "k8s.yaml"

# Recent Kubernetes releases the installed kubernetes-validate ships schemas for.
K8S_VERSIONS = ["1.30.0", "1.33.0"]

GATEWAY_SERVICES = ("gateway-1", "gateway-2")
SIM_SERVICES = ("sim-fast", "sim-slow", "sim-hosted")

# Metrics the gateway exports (histograms are listed with their series suffixes).
KNOWN_METRICS = {
    "gateway_upstream_tokens_per_second",
    "gateway_upstream_inflight",
    "gateway_upstream_ttft_seconds",
    "gateway_upstream_ejected",
    "gateway_upstream_ejections_total",
    "gateway_queue_depth",
    "gateway_requests_total",
    "gateway_upstream_attempts_total",
    "gateway_upstream_capacity_tokens_per_second",
    "gateway_upstream_weight",
    "gateway_upstream_max_concurrency",
    "gateway_upstream_rate_limit_used",
    "gateway_upstream_rate_limit",
    "gateway_upstream_rate_limited_per_minute",
    "gateway_redis_up",
    *(f"gen_ai_client_token_usage{s}" for s in ("_bucket", "_sum", "_count")),
    *(f"gen_ai_client_operation_duration_seconds{s}" for s in ("_bucket", "_sum", "_count")),
}


# --------------------------------------------------------------------------- helpers


def _k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for path in _k8s_manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.name}#{i}", doc))
    return out


def _k8s_objects(kind: str) -> list[dict]:
    return [d for _, d in _k8s_docs() if d.get("kind") == kind]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def _container_path_to_host(service: dict, container_path: str) -> Path | None:
    """Map a path inside a compose container to the repo file a bind mount provides."""
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            src, dst = parts[0], parts[1]
        else:
            src, dst = vol.get("source", ""), vol.get("target", "")
        if not src.startswith((".", "/")):
            continue  # named volume
        if container_path == dst or container_path.startswith(dst.rstrip("/") + "/"):
            rel = container_path[len(dst.rstrip("/")) :].lstrip("/")
            return (DEPLOY / src / rel).resolve()
    return None


# --------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name,doc", [pytest.param(n, d, id=n) for n, d in _k8s_docs()])
def test_k8s_manifest_is_valid(name: str, doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name} ({doc.get('kind')}) invalid for k8s {version}: {e.message} at {list(e.path)}")


def test_k8s_expected_kinds_present() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in _k8s_docs()}
    for expected in [
        ("Namespace", "llm-gateway"),
        ("ConfigMap", "gateway-config"),
        ("Secret", "gateway-secrets"),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("Deployment", "redis"),
        ("Service", "redis"),
        *((k, s) for s in SIM_SERVICES for k in ("Deployment", "Service")),
        ("Deployment", "jaeger"),
        ("Service", "jaeger"),
        ("Deployment", "prometheus"),
        ("Service", "prometheus"),
        ("ConfigMap", "prometheus-config"),
    ]:
        assert expected in kinds, f"missing {expected}"


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    listed = kust["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in _k8s_manifest_files())


def test_k8s_gateway_deployment() -> None:
    (dep,) = [d for d in _k8s_objects("Deployment") if d["metadata"]["name"] == "gateway"]
    spec = dep["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert 35 <= pod["spec"]["terminationGracePeriodSeconds"] <= 60  # 30 s drain + preStop
    (c,) = pod["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in c["lifecycle"]
    assert c["resources"]["requests"]["cpu"]  # HPA on CPU needs a request
    assert any(src.get("secretRef", {}).get("name") == "gateway-secrets" for src in c.get("envFrom", []))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GATEWAY_CONFIG"].startswith("/etc/gateway/")
    assert urlsplit(env["GATEWAY_REDIS_URL"]).hostname in _k8s_service_names()
    assert env["OTEL_SERVICE_NAME"] == "llm-gateway"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    # the ConfigMap holding GATEWAY_CONFIG is mounted there
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    cm_vol = next(n for n, v in vols.items() if v.get("configMap", {}).get("name") == "gateway-config")
    assert env["GATEWAY_CONFIG"] == f"{mounts[cm_vol]}/fleet.yaml"


def test_k8s_hpa_targets_gateway_cpu() -> None:
    (hpa,) = _k8s_objects("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway"
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])


def test_k8s_secret_uses_string_data() -> None:
    (secret,) = _k8s_objects("Secret")
    assert "GATEWAY_ADMIN_KEY" in secret["stringData"]
    fleet = load_fleet(K8S_FLEET)
    for up in fleet.upstreams.values():
        if up.api_key_env:
            assert up.api_key_env in secret["stringData"], f"{up.api_key_env} not in gateway-secrets"


def test_k8s_configmap_matches_config_file() -> None:
    (cm,) = [c for c in _k8s_objects("ConfigMap") if c["metadata"]["name"] == "gateway-config"]
    assert yaml.safe_load(cm["data"]["fleet.yaml"]) == yaml.safe_load(K8S_FLEET.read_text())


def _k8s_service_names() -> dict[str, set[int]]:
    return {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in _k8s_objects("Service")}


# --------------------------------------------------------------------------- compose


def test_compose_schema_is_vendored_spec() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)


def test_compose_file_validates_against_spec() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_has_expected_services() -> None:
    services = _compose()["services"]
    for name in ("redis", "jaeger", *SIM_SERVICES, *GATEWAY_SERVICES):
        assert name in services, name
    assert services["redis"]["image"].startswith("redis:7")
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one")
    assert str(_env(services["jaeger"])["COLLECTOR_OTLP_ENABLED"]).lower() == "true"
    jaeger_ports = " ".join(str(p) for p in services["jaeger"]["ports"])
    assert "16686" in jaeger_ports and "4318" in jaeger_ports
    host_ports = {str(p).split(":")[0] for g in GATEWAY_SERVICES for p in services[g]["ports"]}
    assert host_ports == {"8080", "8081"}


@pytest.mark.parametrize("name", (*GATEWAY_SERVICES, *SIM_SERVICES))
def test_compose_build_references_existing_files(name: str) -> None:
    svc = _compose()["services"][name]
    build = svc["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert DOCKERFILE.is_file()


@pytest.mark.parametrize("name", GATEWAY_SERVICES)
def test_compose_gateway_service(name: str) -> None:
    services = _compose()["services"]
    svc = services[name]
    env = _env(svc)
    cfg = _container_path_to_host(svc, env["GATEWAY_CONFIG"])
    assert cfg == COMPOSE_FLEET.resolve() and cfg.is_file()
    assert urlsplit(env["GATEWAY_REDIS_URL"]).hostname == "redis"
    assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname == "jaeger"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"] == "llm-gateway"
    assert "GATEWAY_ADMIN_KEY" in env
    deps = svc["depends_on"]
    assert deps["redis"]["condition"] == "service_healthy"
    for sim in SIM_SERVICES:
        assert deps[sim]["condition"] == "service_healthy"
        assert "healthcheck" in services[sim]
    for dep in deps:
        assert dep in services


def test_compose_sims() -> None:
    services = _compose()["services"]
    expected = {
        "sim-fast": {"--mode": "gpu", "--base-step": "0.008", "--per-seq": "0.0004", "--slots": "64"},
        "sim-slow": {"--mode": "gpu", "--base-step": "0.02", "--per-seq": "0.0015", "--slots": "16"},
        "sim-hosted": {"--mode": "hosted", "--ttft": "0.4", "--tok-s": "60", "--rpm": "120", "--tpm": "100000"},
    }
    for name, flags in expected.items():
        cmd = _command(services[name])
        assert cmd[:2] == ["gateway", "sim"]
        for flag, value in flags.items():
            assert _flag(cmd, flag) == value, (name, flag)
        port = _flag(cmd, "--port")
        assert port in " ".join(services[name]["healthcheck"]["test"])


def test_compose_mounted_files_exist() -> None:
    for name, svc in _compose()["services"].items():
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"


# --------------------------------------------------------------------------- fleet configs


@pytest.mark.parametrize("path", [COMPOSE_FLEET, K8S_FLEET], ids=lambda p: p.name)
def test_fleet_config_loads(path: Path) -> None:
    fleet = load_fleet(path)
    assert {"fast-gpu", "slow-gpu", "hosted"} <= set(fleet.upstreams)
    assert fleet.resolve("gpt-4o-mini") is not None


def test_load_fleet_rejects_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: {a: {base_url: ftp://x}}\nmodels: {m: {upstreams: [b]}}\n")
    with pytest.raises(ConfigError):
        load_fleet(bad)


def _compose_endpoints() -> dict[str, set[int]]:
    """Service name -> ports it listens on inside the compose network."""
    out: dict[str, set[int]] = {}
    for name, svc in _compose()["services"].items():
        ports: set[int] = set()
        cmd = _command(svc)
        if "--port" in cmd:
            ports.add(int(_flag(cmd, "--port")))
        if "GATEWAY_PORT" in _env(svc):
            ports.add(int(_env(svc)["GATEWAY_PORT"]))
        ports.update(int(str(p).split("/")[0]) for p in svc.get("expose") or [])
        out[name] = ports
    return out


def _upstream_urls(path: Path) -> list[tuple[str, str]]:
    fleet = load_fleet(path)
    urls = []
    for name, up in fleet.upstreams.items():
        urls.append((name, up.base_url))
        if up.metrics_url:
            urls.append((name, up.metrics_url))
    return urls


@pytest.mark.parametrize(
    "path,endpoints",
    [(COMPOSE_FLEET, _compose_endpoints), (K8S_FLEET, _k8s_service_names)],
    ids=["compose", "k8s"],
)
def test_fleet_hosts_exist_in_stack(path: Path, endpoints) -> None:
    known = endpoints()
    for upstream, url in _upstream_urls(path):
        parts = urlsplit(url)
        host = parts.hostname
        assert host in known, f"{path.name}: upstream {upstream!r} host {host!r} is not a service ({sorted(known)})"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        assert port in known[host], f"{path.name}: {upstream!r} uses {host}:{port}, service listens on {known[host]}"


# --------------------------------------------------------------------------- grafana


def _dashboard_panels() -> list[dict]:
    dash = json.loads(DASHBOARD.read_text())
    panels = []
    for p in dash["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))  # collapsed rows
    return [p for p in panels if p.get("type") != "row"]


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r"\{[^}]*\}")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _metric_names(expr: str) -> set[str]:
    stripped = _SELECTOR.sub("", _GROUPING.sub("", expr))
    return {t for t in _IDENT.findall(stripped) if t.startswith(("gateway_", "gen_ai_"))}


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    panels = _dashboard_panels()
    assert len(panels) >= 7
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["type"] == "timeseries"
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert p["targets"]


def test_dashboard_queries_known_metrics() -> None:
    used: set[str] = set()
    for p in _dashboard_panels():
        for t in p["targets"]:
            names = _metric_names(t["expr"])
            assert names, f"panel {p['title']!r}: no gateway metric in {t['expr']!r}"
            unknown = names - KNOWN_METRICS
            assert not unknown, f"panel {p['title']!r}: unknown metric(s) {unknown}"
            used |= names
    # the dashboard covers the headline signals
    for m in (
        "gateway_upstream_tokens_per_second",
        "gateway_upstream_inflight",
        "gateway_upstream_ttft_seconds",
        "gateway_queue_depth",
        "gateway_upstream_ejections_total",
        "gateway_requests_total",
        "gen_ai_client_token_usage_sum",
    ):
        assert m in used, f"dashboard does not chart {m}"


def test_metric_name_extraction() -> None:
    expr = 'sum by (gen_ai_token_type) (rate(gen_ai_client_token_usage_sum{gen_ai_provider_name="x"}[5m]))'
    assert _metric_names(expr) == {"gen_ai_client_token_usage_sum"}
    assert _metric_names("rate(gateway_bogus_total[1m])") == {"gateway_bogus_total"}


def test_grafana_provisioning() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert urlsplit(ds["datasources"][0]["url"]).hostname in _compose()["services"]
    dashboards = yaml.safe_load((prov / "dashboards" / "llm-gateway.yaml").read_text())
    path = dashboards["providers"][0]["options"]["path"]
    grafana = _compose()["services"]["grafana"]
    targets = [v.split(":")[1] for v in grafana["volumes"] if v.startswith("./grafana/dashboard.json")]
    assert targets and all(t.startswith(path.rstrip("/") + "/") for t in targets)


def test_prometheus_scrapes_gateways() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    services = _compose_endpoints()
    for t in targets:
        host, port = t.rsplit(":", 1)
        assert host in services and int(port) in services[host], t
    assert {f"{g}:8080" for g in GATEWAY_SERVICES} <= targets


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def test_dockerfile_base_image() -> None:
    ins = _dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), a.split()[0])
        for op, a in ins
        if op == "FROM"
    ]
    assert bases and all(b.startswith("python:3.11-slim") for b in bases), bases


def test_dockerfile_runs_as_non_root() -> None:
    users = [a for op, a in _final_stage() if op == "USER"]
    assert users, "no USER in final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_healthcheck_and_cmd() -> None:
    final = _final_stage()
    hc = [a for op, a in final if op == "HEALTHCHECK"]
    assert hc and "/healthz" in (hc[-1] + (DEPLOY / "healthcheck.py").read_text())
    assert "python" in hc[-1] and "curl" not in hc[-1]
    assert any(op == "EXPOSE" and "8080" in a.split() for op, a in final)
    cmds = [a for op, a in final if op == "CMD"]
    assert cmds
    cmd = cmds[-1]
    argv = json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)
    assert argv[:2] == ["gateway", "serve"]
    # the files the Dockerfile copies exist in the build context (repo root)
    for op, a in _dockerfile_instructions():
        if op == "COPY" and "--from" not in a:
            srcs = [s for s in a.split()[:-1] if not s.startswith("--")]
            for s in srcs:
                matches = list(ROOT.glob(s))
                assert matches or "*" in s, f"COPY source {s} missing"


# --------------------------------------------------------------------------- telemetry wiring (issue 12, item 8)


def _k8s_gateway_env() -> dict[str, str]:
    (dep,) = [d for d in _k8s_objects("Deployment") if d["metadata"]["name"] == "gateway"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return {e["name"]: str(e.get("value")) for e in c["env"]}


def _telemetry_under(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    from gateway.observability.telemetry import Telemetry

    for k in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("OTEL_"):
            monkeypatch.setenv(k, v)
    return Telemetry()


@pytest.mark.parametrize("where", ["compose", "k8s"])
async def test_traces_to_jaeger_and_no_otlp_metrics(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(_compose()["services"]["gateway-1"]) if where == "compose" else _k8s_gateway_env()
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    if where == "compose":
        ports = {int(str(p).split(":")[-1]) for p in _compose()["services"]["jaeger"]["ports"]}
    else:
        ports = _k8s_service_names()["jaeger"]
    assert endpoint.hostname == "jaeger" and endpoint.port in ports  # a Jaeger these files contain
    tel = _telemetry_under(env, monkeypatch)
    try:
        assert tel.tracing_enabled  # traces go to Jaeger
        assert not tel.otlp_metrics  # Jaeger takes no metrics: no push, no export error every interval
    finally:
        await tel.shutdown(0.1)


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_gateway_env_has_no_unknown_gateway_variables(where: str) -> None:
    from gateway.settings import unknown_env_vars

    env = _env(_compose()["services"]["gateway-1"]) if where == "compose" else _k8s_gateway_env()
    assert unknown_env_vars(env) == []


def test_k8s_prometheus_scrapes_every_gateway_pod() -> None:
    (cm,) = [c for c in _k8s_objects("ConfigMap") if c["metadata"]["name"] == "prometheus-config"]
    prom = yaml.safe_load(cm["data"]["prometheus.yml"])
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "llm-gateway"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    (svc,) = [s for s in _k8s_objects("Service") if s["metadata"]["name"] == sd["names"][0]]
    assert svc["spec"]["clusterIP"] == "None"  # headless: one A record per pod, each replica scraped
    (dep,) = [d for d in _k8s_objects("Deployment") if d["metadata"]["name"] == "gateway"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert sd["port"] == 8080 and sd["type"] == "A"
    (pdep,) = [d for d in _k8s_objects("Deployment") if d["metadata"]["name"] == "prometheus"]
    vols = pdep["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("configMap", {}).get("name") == "prometheus-config" for v in vols)
