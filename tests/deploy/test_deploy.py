"""deploy/, validated statically (no container runtime or cluster here): the Kubernetes
manifests render with kustomize and pass the API's schemas offline; the compose file and the
Dockerfile name only what the project has; the configs they mount load."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from thinkcap.cli.main import build_parser
from thinkcap.proxy.serve_file import ExtprocSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release the manifests are checked against
KUBECTL = shutil.which("kubectl")


def render(folder: str) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the kustomize rendering is not checked")
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / folder)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def test_the_manifests_render_and_pass_the_kubernetes_schemas() -> None:
    """The kustomization renders its six objects and each passes the Kubernetes schemas, strictly."""
    objs = render("k8s")
    assert sorted(o["kind"] for o in objs) == [
        "ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Service", "Service",
    ]  # fmt: skip
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_a_schema_violation_is_caught() -> None:
    """The validation is real: a misspelt field fails it."""
    deployment = by_kind(render("k8s"), "Deployment")[0]
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_deployment_probes_and_runs_thinkcap_from_its_config_map() -> None:
    """The Deployment probes /readyz and /healthz, runs non-root, and runs ``thinkcap serve`` on the
    config its ConfigMap holds, which loads and points at the example's Redis."""
    objs = render("k8s")
    thinkcap = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "thinkcap")
    pod = thinkcap["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert thinkcap["spec"]["replicas"] >= 2
    # the arguments are a real command line of the CLI, reading the mounted config
    args = build_parser().parse_args(container["args"])
    assert args.run.__module__ == "thinkcap.cli.serve"
    (mount,) = container["volumeMounts"]
    assert args.config == f"{mount['mountPath']}/thinkcap.toml"
    (config_map,) = by_kind(objs, "ConfigMap")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]  # the generated name, hash included
    # the config in the map is one thinkcap serve reads, listening where the probes look
    text = config_map["data"]["thinkcap.toml"]
    settings = load_settings("thinkcap.toml", tomllib.loads(text))
    (port,) = container["ports"]
    assert settings.proxy.port == port["containerPort"] and settings.proxy.host == "0.0.0.0"
    # it finds Redis at the example's Service
    redis_service = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "thinkcap-redis")
    assert settings.cluster.redis_url == f"redis://thinkcap-redis:{redis_service['spec']['ports'][0]['port']}/0"


def test_the_grace_periods_cover_the_drain() -> None:
    """The pod's grace period covers the preStop sleep, min_drain_s, drain_timeout_s and the
    close; min_drain_s outlasts the readiness probe's period x failure threshold (so the load
    balancer has seen /readyz fail before the listener closes); compose's stop grace period
    covers the drain too."""
    objs = render("k8s")
    thinkcap = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "thinkcap")
    pod = thinkcap["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (config_map,) = by_kind(objs, "ConfigMap")
    proxy = load_settings("thinkcap.toml", tomllib.loads(config_map["data"]["thinkcap.toml"])).proxy
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    probe = container["readinessProbe"]
    assert proxy.min_drain_s > probe["periodSeconds"] * probe["failureThreshold"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + proxy.min_drain_s + proxy.drain_timeout_s + 2
    assert proxy.drain_timeout_s >= 60  # reasoning answers run long
    for service in compose()["services"].values():
        if service.get("image", "").startswith("thinkcap:"):
            local = load_settings(DEPLOY / "thinkcap.toml").proxy
            grace = float(service["stop_grace_period"].removesuffix("s"))
            assert grace >= local.min_drain_s + local.drain_timeout_s + 2


def test_the_service_and_the_budget_select_the_pods() -> None:
    """The Service and the PodDisruptionBudget select the Deployments' pods, and the budget lets a
    drain proceed."""
    objs = render("k8s")
    for d in by_kind(objs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pods = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "thinkcap")
    labels = pods["spec"]["template"]["metadata"]["labels"]
    service = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "thinkcap")
    assert service["spec"]["selector"].items() <= labels.items()
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < pods["spec"]["replicas"]  # a drain can always proceed


def test_the_prometheus_overlay_adds_a_service_monitor_on_the_metrics() -> None:
    """The ServiceMonitor is a CRD (no schema in the API's): its fields are checked here."""
    objs = render("k8s-prometheus")
    (monitor,) = by_kind(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = next(s for s in by_kind(objs, "Service") if s["metadata"]["name"] == "thinkcap")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    for o in objs:
        if o["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def test_compose_runs_two_thinkcap_replicas_redis_and_a_model_server() -> None:
    """compose runs two thinkcap replicas built from the Dockerfile, on a config that loads, in
    front of its Redis and model server."""
    services = compose()["services"]
    thinkcaps = {n: s for n, s in services.items() if s.get("image", "").startswith("thinkcap:")}
    assert len(thinkcaps) == 2 and {"redis", "model"} <= services.keys()
    for service in thinkcaps.values():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        args = build_parser().parse_args(service["command"])  # a real command of the CLI
        assert args.run.__module__ == "thinkcap.cli.serve"
        mounts = dict(v.split(":")[:2] for v in service["volumes"])
        host = next(h for h, c in mounts.items() if c == args.config)
        settings = load_settings(DEPLOY / host)  # the file exists and loads
        backend_host = settings.backend.url.split("//")[1].split(":")[0]
        redis_host = (settings.cluster.redis_url or "").split("//")[1].split(":")[0]
        assert {backend_host, redis_host} <= services.keys()
        assert set(service["depends_on"]) == {backend_host, redis_host}
    published = [p.split(":")[0] for s in thinkcaps.values() for p in s["ports"]]
    assert len(set(published)) == 2
    assert "--parallel" in services["model"]["command"]  # a batching llama-server: slots = --parallel
    n = services["model"]["command"][services["model"]["command"].index("--parallel") + 1]
    assert load_settings(DEPLOY / "thinkcap.toml").backend.slots == int(n)


def dockerfile() -> list[tuple[str, str]]:
    lines, out = (DEPLOY / "Dockerfile").read_text().splitlines(), []
    joined = ""
    for line in lines:
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = joined.strip().partition(" ")
            out.append((word.upper(), rest))
            joined = ""
    return out


def test_the_dockerfile_is_slim_non_root_checks_health_and_copies_what_exists() -> None:
    """The Dockerfile builds on slim images, runs as a non-root user, checks /healthz and copies
    only what exists."""
    steps = dockerfile()
    bases = [rest for word, rest in steps if word == "FROM"]
    assert all(b.split()[0].endswith("-slim") for b in bases)
    (user,) = [rest for word, rest in steps if word == "USER"]
    assert user not in {"root", "0"}
    (health,) = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert "/healthz" in health and ":8000/" in health
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "'.[fast]'" in runs and "--constraint constraints.txt" in runs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "fast" in pyproject["project"]["optional-dependencies"]
    (entry,) = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert yaml.safe_load(entry) == ["thinkcap"] and "thinkcap" in pyproject["project"]["scripts"]
    (cmd,) = [rest for word, rest in steps if word == "CMD"]
    build_parser().parse_args(yaml.safe_load(cmd))
    assert shlex.split(health)  # the health check is one well-formed command line


ENVOY = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
GATEWAY = DEPLOY / "gateway"


def test_the_envoy_config_validates_and_attaches_thinkcap_as_its_processor() -> None:
    """``deploy/gateway/envoy.yaml`` passes Envoy's own validation (the real binary), and its
    ext_proc filter asks what thinkcap needs: buffered request bodies, the answer's mode left to
    thinkcap (allow_mode_override), a message timeout above ``[extproc] message_timeout_s``,
    a buffer that takes large prompts, and gRPC health checks of the processor."""
    out = subprocess.run([ENVOY, "--mode", "validate", "-c", str(GATEWAY / "envoy.yaml"), "--base-id", "779",
                          "-l", "error"], capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load((GATEWAY / "envoy.yaml").read_text())
    (listener,) = config["static_resources"]["listeners"]
    assert listener["per_connection_buffer_limit_bytes"] >= 4 * 1024 * 1024
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    ext = hcm["http_filters"][0]["typed_config"]
    mode = ext["processing_mode"]
    assert mode["request_body_mode"] == "BUFFERED" and mode["request_header_mode"] == "SEND"
    assert ext["allow_mode_override"] is True
    assert float(ext["message_timeout"].removesuffix("s")) > ExtprocSettings().message_timeout_s
    cluster = next(
        c
        for c in config["static_resources"]["clusters"]
        if c["name"] == ext["grpc_service"]["envoy_grpc"]["cluster_name"]
    )
    port = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"
    ]
    assert port == ExtprocSettings().port
    assert (
        cluster["health_checks"][0]["grpc_health_check"]["service_name"]
        == "envoy.service.ext_proc.v3.ExternalProcessor"
    )


def test_the_gateway_attachments_point_at_the_processor_in_order() -> None:
    """Envoy Gateway's policy attaches thinkcap to the model's route with buffered bodies and
    mode overrides, its ClientTrafficPolicy raises the buffer for large prompts; Istio's
    EnvoyFilter puts the processor before the router; with the inference extension, thinkcap
    comes before the endpoint picker, both full-duplex."""
    gateway = list(yaml.safe_load_all((GATEWAY / "envoy-gateway.yaml").read_text()))
    service = next(d for d in gateway if d["kind"] == "Service")
    kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    policy = next(d for d in gateway if d["kind"] == "EnvoyExtensionPolicy")
    (ext,) = policy["spec"]["extProc"]
    assert ext["backendRefs"][0] == {"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}
    assert ext["processingMode"]["request"]["body"] == "Buffered" and ext["processingMode"]["allowModeOverride"]
    traffic = next(d for d in gateway if d["kind"] == "ClientTrafficPolicy")
    assert traffic["spec"]["connection"]["bufferLimit"].endswith("Mi")
    istio = yaml.safe_load((GATEWAY / "istio-envoyfilter.yaml").read_text())
    (patch,) = istio["spec"]["configPatches"]
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert patch["patch"]["value"]["typed_config"]["processing_mode"]["request_body_mode"] == "BUFFERED"
    chain = yaml.safe_load((GATEWAY / "inference-extension.yaml").read_text())["spec"]["extProc"]
    assert [e["backendRefs"][0]["name"] for e in chain] == [service["metadata"]["name"], "llm-pool-epp"]
    assert all(e["processingMode"]["request"]["body"] == "FullDuplexStreamed" for e in chain)
