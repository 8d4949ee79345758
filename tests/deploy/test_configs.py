"""The shipped deployment files: load-balancer syntax checks, schemas, and the choices that matter.

No network. nginx and HAProxy check the configs themselves (`nginx -t`,
`haproxy -c`); the compose file is validated against the compose-spec JSON
schema vendored in schemas/, the Kubernetes manifests against the schemas that
`kubernetes-validate` bundles; the rest are focused assertions on what the
deployment depends on (probes, grace periods, timeouts, body limits).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.render import HAPROXY_CFG, NGINX_CONF, NGINX_DIR, render_haproxy, render_nginx
from tests.deploy.balancers import balancer_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
KUBERNETES = DEPLOY / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# How long a broker may take to end its streams after SIGTERM.
DRAIN_SECONDS = 10
MAX_BODY_BYTES = 1024 * 1024
# A pod that drains (or stops answering) leaves the endpoints within this long.
UNREADY_WITHIN_SECONDS = 15
BROKER_HOSTS = ["broker1", "broker2", "broker3"]
K8S_VERSIONS = ["1.29.0", "1.37.0"]
# Runs nginx or HAProxy: not in `make test-fast` (-m "not e2e"), which installs neither.
NEEDS_BALANCER = pytest.mark.e2e


def dev_dependency(module: str, package: str) -> Any:
    """Import a validator the suite needs, or fail saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{package} is missing: .venv/bin/pip install {package}", pytrace=False)


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def directives(path: Path) -> dict[str, list[str]]:
    """`name -> [arguments, ...]` of the simple directives in an nginx file (comments dropped)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        code = line.split("#", 1)[0].strip()
        if code.endswith(";"):
            name, _, args = code[:-1].partition(" ")
            found.setdefault(name, []).append(args.strip())
    return found


def seconds(value: str) -> float:
    """nginx/HAProxy/compose durations: `1h`, `30s`, `500ms`, `2m`, or bare seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value.strip())
    assert match, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match[2]]
    return int(match[1]) * scale


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes, by kind (one object per kind)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']} objects"
            found[document["kind"]] = document
    return found


# --- nginx -------------------------------------------------------------------


@NEEDS_BALANCER
def test_rendered_loopback_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    conf = render_nginx(18080, [18001, 18002, 18003], tmp_path)
    result = run([balancer_binary("nginx"), "-t", "-c", str(conf), "-p", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "[emerg]" not in result.stderr and "[warn]" not in result.stderr, result.stderr


def test_rendered_nginx_config_is_the_shipped_one_on_loopback(tmp_path: Path) -> None:
    rendered = render_nginx(18080, [18001, 18002], tmp_path).read_text()
    for name in ("sse-http.conf", "sse-proxy.conf"):
        assert f"include {NGINX_DIR / name};" in rendered
    assert "listen 127.0.0.1:18080;" in rendered
    assert "server 127.0.0.1:18001 max_fails=0;" in rendered
    assert "broker1" not in rendered
    changed = {"pid", "error_log", "access_log", "listen", "server", "include", "user", "daemon"}
    kept = [
        line
        for line in NGINX_CONF.read_text().splitlines()
        if line.strip() and line.split()[0] not in changed
    ]
    assert all(line in rendered.splitlines() for line in kept)


@NEEDS_BALANCER
def test_compose_nginx_config_passes_nginx_t_with_brokers_on_loopback(tmp_path: Path) -> None:
    """The files mounted as compose mounts them; only the broker hostnames become 127.0.0.1.

    nginx resolves upstream names while checking, and broker1 only resolves on
    the compose network; everything else is checked exactly as the container sees it.
    """
    etc_nginx = tmp_path / "etc" / "nginx"
    etc_nginx.mkdir(parents=True)
    for source, target in nginx_mounts().items():
        assert target.startswith("/etc/nginx/"), target
        shutil.copy(DEPLOY / source, etc_nginx / target.removeprefix("/etc/nginx/"))
    conf = etc_nginx / "nginx.conf"
    text = conf.read_text()
    for host in BROKER_HOSTS:
        text = text.replace(f"server {host}:8000 ", "server 127.0.0.1:8000 ")
    conf.write_text(text)
    result = run([balancer_binary("nginx"), "-t", "-p", f"{etc_nginx}/", "-c", str(conf)])
    assert result.returncode == 0, result.stderr


def nginx_mounts() -> dict[str, str]:
    """`file under deploy/ -> path in the container` for the compose nginx service."""
    mounts = {}
    for volume in compose()["services"]["nginx"]["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[source.removeprefix("./")] = target
    return mounts


def test_compose_mounts_every_file_the_nginx_config_includes() -> None:
    mounted = set(nginx_mounts())
    included = {f"nginx/{name}" for name in directives(NGINX_CONF)["include"]}
    assert "nginx/nginx.conf" in mounted
    assert included <= mounted
    assert all((DEPLOY / source).is_file() for source in mounted)


def test_nginx_upstreams_are_the_compose_brokers() -> None:
    servers = [args.split()[0] for args in directives(NGINX_CONF)["server"]]
    assert servers == [f"{host}:8000" for host in BROKER_HOSTS]
    assert set(BROKER_HOSTS) <= set(compose()["services"])


def test_nginx_proxies_streams_unbuffered_with_long_reads() -> None:
    proxy = directives(NGINX_DIR / "sse-proxy.conf")
    assert proxy["proxy_buffering"] == ["off"]
    assert proxy["proxy_cache"] == ["off"]
    assert proxy["proxy_http_version"] == ["1.1"]
    assert 'Connection ""' in proxy["proxy_set_header"]
    assert "Last-Event-ID $http_last_event_id" in proxy["proxy_set_header"]
    assert seconds(proxy["proxy_read_timeout"][0]) >= 3600
    # The Host with its port ($host drops it): a cookie publish's Origin is checked
    # against it, and the live page's own publishes were refused behind nginx on :8080.
    assert "Host $http_host" in proxy["proxy_set_header"]
    assert directives(NGINX_DIR / "sse-http.conf")["gzip"] == ["off"]


def test_nginx_retries_only_what_never_reached_a_broker() -> None:
    proxy = directives(NGINX_DIR / "sse-proxy.conf")
    assert proxy["proxy_next_upstream"] == ["error timeout"]
    assert "non_idempotent" not in " ".join(proxy["proxy_next_upstream"])


def test_nginx_never_marks_a_broker_failed_but_skips_a_dead_one_per_request() -> None:
    """Passive failure marking kept restarted brokers out; a rolling restart then hit
    "no live upstreams" (502), which ends a browser's EventSource for good."""
    servers = directives(NGINX_CONF)["server"]
    for args in servers:
        assert "max_fails=0" in args.split(), args
        assert "fail_timeout=" not in args and "backup" not in args, args
    proxy = directives(NGINX_DIR / "sse-proxy.conf")
    # Each request tries every broker, and an unreachable one costs little.
    assert int(proxy["proxy_next_upstream_tries"][0]) >= len(servers)
    assert seconds(proxy["proxy_connect_timeout"][0]) <= 2
    assert seconds(proxy["proxy_next_upstream_timeout"][0]) >= len(servers) * seconds(
        proxy["proxy_connect_timeout"][0]
    )


def test_nginx_keeps_idle_upstream_connections_shorter_than_uvicorn() -> None:
    uvicorn_keep_alive = 5
    timeouts = directives(NGINX_CONF)["keepalive_timeout"]
    assert seconds(timeouts[0]) < uvicorn_keep_alive


def test_bodies_pass_unbuffered_and_a_streaming_ingest_has_no_size_limit() -> None:
    """A streaming ingest is one chunked body as long as its token stream: a proxy that
    buffers bodies delivers a generation at its end, and a size limit cuts it."""
    assert directives(NGINX_DIR / "sse-http.conf")["client_max_body_size"] == ["0"]
    assert directives(NGINX_DIR / "sse-proxy.conf")["proxy_request_buffering"] == ["off"]
    annotations = manifests()["Ingress"]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"


def test_kubernetes_puts_no_service_links_in_the_pods_environment() -> None:
    """The Service "broker" adds BROKER_SERVICE_HOST, BROKER_PORT=tcp://... and more to
    every pod: the broker stopped at start on those unknown settings (crash loop)."""
    objects = manifests()
    assert objects["Service"]["metadata"]["name"].upper().startswith("BROKER")
    assert objects["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_the_publish_body_limit_is_one_mebibyte_where_it_is_set() -> None:
    assert f"gt {MAX_BODY_BYTES} }}" in HAPROXY_CFG.read_text()
    broker_env = compose()["services"]["broker1"]["environment"]
    assert broker_env["BROKER_MAX_BODY_BYTES"] == str(MAX_BODY_BYTES)
    objects = manifests()
    assert objects["ConfigMap"]["data"]["BROKER_MAX_BODY_BYTES"] == str(MAX_BODY_BYTES)


# --- HAProxy -----------------------------------------------------------------


@NEEDS_BALANCER
def test_rendered_loopback_haproxy_config_passes_haproxy_c(tmp_path: Path) -> None:
    cfg = render_haproxy(18081, [18001, 18002, 18003], tmp_path)
    result = run([balancer_binary("haproxy"), "-c", "-f", str(cfg)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout + result.stderr, result.stdout + result.stderr


@NEEDS_BALANCER
def test_shipped_haproxy_config_passes_haproxy_c_without_dns() -> None:
    """`init-addr last,libc,none` lets HAProxy start before the broker names resolve."""
    result = run([balancer_binary("haproxy"), "-c", "-f", str(HAPROXY_CFG)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    warnings = [line for line in output.splitlines() if "[WARNING]" in line]
    assert all("could not resolve address" in line for line in warnings), output


def test_rendered_haproxy_config_is_the_shipped_one_on_loopback(tmp_path: Path) -> None:
    rendered = render_haproxy(18081, [18001, 18002], tmp_path).read_text().splitlines()
    assert "    bind 127.0.0.1:18081" in rendered
    # Once in each backend (brokers, brokers_alive).
    assert rendered.count("    server broker2 127.0.0.1:18002 check") == 2
    dropped = ("resolvers", "nameserver", "hold", "bind", "server", "default-server")
    kept = [
        line
        for line in HAPROXY_CFG.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", *dropped))
    ]
    assert all(line in rendered for line in kept)


def test_haproxy_passes_each_event_and_line_on_at_once() -> None:
    """Without ``option http-no-delay`` HAProxy held each event (and each line of a
    streaming ingest) back about 200 ms: p50 112 ms, max 215 ms, against 1 and 8 ms
    with it (measured through the shipped config, HAProxy 2.6.12)."""
    assert "option http-no-delay" in haproxy_sections()["defaults"]


def haproxy_lines(path: Path = HAPROXY_CFG) -> list[str]:
    return [
        line.split("#", 1)[0].strip()
        for line in path.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]


def haproxy_sections(path: Path = HAPROXY_CFG) -> dict[str, list[str]]:
    """`"backend brokers" -> [its lines]`, for every section of an HAProxy file."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in path.read_text().splitlines():
        code = raw.split("#", 1)[0].rstrip()
        if not code.strip():
            continue
        if not code[0].isspace():
            current = sections.setdefault(code.strip(), [])
        else:
            current.append(code.strip())
    return sections


def test_rendered_haproxy_config_keeps_every_backend_with_loopback_servers(
    tmp_path: Path,
) -> None:
    rendered = render_haproxy(18081, [18001, 18002], tmp_path)
    shipped, ours = haproxy_sections(), haproxy_sections(rendered)
    assert list(ours) == [name for name in shipped if not name.startswith("resolvers")]
    backends = [name for name in shipped if name.startswith("backend ")]
    assert len(backends) >= 2
    for name in backends:
        assert [line for line in ours[name] if not line.startswith("server ")] == [
            line for line in shipped[name] if not line.startswith("server ")
        ], name
        assert [line for line in ours[name] if line.startswith("server ")] == [
            "server broker1 127.0.0.1:18001 check",
            "server broker2 127.0.0.1:18002 check",
        ], name


def checked_path(backend: list[str]) -> str:
    assert "option httpchk" in backend
    assert "http-check expect status 200" in backend
    send = next(line.split() for line in backend if line.startswith("http-check send"))
    return send[send.index("uri") + 1]


def test_haproxy_checks_readyz_and_balances_streams_by_least_connections() -> None:
    sections = haproxy_sections()
    assert checked_path(sections["backend brokers"]) == "/readyz"
    assert "balance leastconn" in sections["defaults"]
    default_server = next(
        line for line in sections["defaults"] if line.startswith("default-server")
    )
    assert "inter 1s fall 2 rise 2" in default_server
    for name in ("backend brokers", "backend brokers_alive"):
        servers = [line.split() for line in sections[name] if line.startswith("server ")]
        assert [server[1] for server in servers] == BROKER_HOSTS
        assert all(server[2] == f"{server[1]}:8000" and "check" in server for server in servers)


def test_haproxy_falls_back_to_live_brokers_when_none_is_ready() -> None:
    """Every broker draining at once marks them all unready; HAProxy must not answer 503.

    A draining broker answers a new stream with a 200 "retry" and the browser
    comes back; HAProxy's own 503 would end its EventSource for good. So ready
    brokers are used while there is one, and brokers merely up (/healthz) otherwise.
    """
    sections = haproxy_sections()
    frontend = next(lines for name, lines in sections.items() if name.startswith("frontend "))
    assert "use_backend brokers if { nbsrv(brokers) gt 0 }" in frontend
    assert "default_backend brokers_alive" in frontend
    assert checked_path(sections["backend brokers_alive"]) == "/healthz"
    # An unready broker's open streams are not cut when it is marked down.
    assert not any("on-marked-down" in line for line in haproxy_lines())


def test_haproxy_keeps_streams_open() -> None:
    lines = haproxy_lines()
    timeouts = {
        line.split()[1]: seconds(line.split()[2]) for line in lines if line.startswith("timeout ")
    }
    assert timeouts["server"] >= 3600 and timeouts["client"] >= 3600 and timeouts["tunnel"] >= 3600
    assert "option http-server-close" not in lines and "option httpclose" not in lines
    assert not any(line.startswith("compression") for line in lines)


def test_haproxy_resends_only_connects_and_unanswered_gets() -> None:
    """A GET a draining broker closed unanswered goes to another broker; a publish never.

    (tests/deploy/test_retries.py shows both on a running HAProxy.)
    """
    sections = haproxy_sections()
    retry_on = next(line for line in sections["defaults"] if line.startswith("retry-on "))
    assert retry_on.split()[1:] == ["conn-failure", "empty-response"]
    assert any(line.startswith("retries ") for line in sections["defaults"])
    assert any(line.startswith("option redispatch") for line in sections["defaults"])
    frontend = next(lines for name, lines in sections.items() if name.startswith("frontend "))
    assert "http-request disable-l7-retry unless METH_GET" in frontend


# --- docker compose ------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema() -> None:
    jsonschema = dev_dependency("jsonschema", "jsonschema")
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []


def test_compose_redis_is_durable() -> None:
    redis = compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    volume_name, mount = redis["volumes"][0].split(":")[:2]
    assert mount == "/data" and volume_name in compose()["volumes"]


def test_compose_brokers_build_the_image_and_outlast_their_drain() -> None:
    services = compose()["services"]
    for host in BROKER_HOSTS:
        broker = services[host]
        context = (COMPOSE_FILE.parent / broker["build"]["context"]).resolve()
        assert (context / broker["build"]["dockerfile"]).is_file()
        assert (context / "pyproject.toml").is_file()
        assert broker["environment"]["BROKER_REDIS_URL"] == "redis://redis:6379/0"
        assert seconds(broker["stop_grace_period"]) >= DRAIN_SECONDS + 5
        assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
        check = " ".join(broker["healthcheck"]["test"])
        assert "/readyz" in check and "/readyz/store" not in check, check


def test_compose_nginx_is_published_on_8080() -> None:
    nginx = compose()["services"]["nginx"]
    assert "8080:8080" in nginx["ports"]
    assert directives(NGINX_CONF)["listen"] == ["8080"]
    assert set(BROKER_HOSTS) <= set(nginx["depends_on"])


def test_dockerfile_installs_the_project_on_python_311_slim() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert "pip install -c requirements.lock ." in dockerfile, "the image installs the lock"
    context = DEPLOY.parent
    assert (context / "requirements.lock").is_file()
    assert "requirements.lock" not in (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert 'ENTRYPOINT ["broker", "serve"]' in dockerfile
    assert re.search(r"^USER ", dockerfile, re.M), "the broker must not run as root"
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


# --- Kubernetes ----------------------------------------------------------------


def k8s_files() -> list[Path]:
    return [path for path in sorted(KUBERNETES.glob("*.yaml")) if path.name != "kustomization.yaml"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_files(), ids=lambda path: path.name)
def test_kubernetes_manifest_matches_the_api_schema(path: Path, version: str) -> None:
    kubernetes_validate = dev_dependency("kubernetes_validate", "kubernetes-validate")
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(path.name for path in k8s_files())


def broker_container() -> dict[str, Any]:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    container: dict[str, Any] = pod["containers"][0]
    return container


def test_deployment_probes_readiness_and_liveness_separately() -> None:
    container = broker_container()
    assert manifests()["Deployment"]["spec"]["replicas"] == 3
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    for probe in (readiness, liveness):
        assert ports[probe["httpGet"]["port"]] == 8000
    assert "8000" in container["args"]


def test_readiness_follows_the_drain_and_not_the_store() -> None:
    """/readyz is 503 only while a broker drains, so the probe may be prompt: a Redis
    outage cannot pull every pod (and leave the ingress answering 503, final for an
    EventSource). Still, one slow answer must not pull a pod."""
    readiness = broker_container()["readinessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz", "never /readyz/store: Redis is shared"
    period, failures = readiness["periodSeconds"], readiness["failureThreshold"]
    assert failures >= 2
    assert failures * period + readiness["timeoutSeconds"] <= UNREADY_WITHIN_SECONDS
    assert readiness["successThreshold"] == 1


def test_deployment_drains_after_leaving_the_endpoints() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    command = broker_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 3
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + DRAIN_SECONDS + 5


def test_deployment_reads_the_redis_url_from_the_secret() -> None:
    objects = manifests()
    env = {item["name"]: item for item in broker_container()["env"]}
    ref = env["BROKER_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    secret = objects["Secret"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    config_ref = broker_container()["envFrom"][0]["configMapRef"]["name"]
    assert config_ref == objects["ConfigMap"]["metadata"]["name"]


def test_service_ingress_and_budget_select_the_broker_pods() -> None:
    objects = manifests()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels.items()
    )
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    target = service["spec"]["ports"][0]["targetPort"]
    assert target in {port["name"] for port in broker_container()["ports"]}
    backend = objects["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] == service["spec"]["ports"][0]["name"]


def test_ingress_is_tuned_for_server_sent_events() -> None:
    annotations = manifests()["Ingress"]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert int(annotations[prefix + "proxy-read-timeout"]) >= 3600
    assert int(annotations[prefix + "proxy-send-timeout"]) >= 3600
    assert "non_idempotent" not in annotations[prefix + "proxy-next-upstream"]
    assert manifests()["Ingress"]["spec"]["ingressClassName"] == "nginx"


# --- render.py -------------------------------------------------------------------


@pytest.mark.parametrize("render", [render_nginx, render_haproxy])
def test_render_refuses_what_cannot_run(render: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="upstream"):
        render(18080, [], tmp_path)
    with pytest.raises(ValueError, match="not a TCP port"):
        render(18080, [70000], tmp_path)


def test_render_fails_loudly_when_the_shipped_file_changes_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deploy.render

    changed = tmp_path / "haproxy.cfg"
    changed.write_text(HAPROXY_CFG.read_text().replace("bind :8080", "bind :9090"))
    monkeypatch.setattr(deploy.render, "HAPROXY_CFG", changed)
    with pytest.raises(deploy.render.ShippedConfigChanged, match="bind"):
        render_haproxy(18081, [18001], tmp_path / "work")
