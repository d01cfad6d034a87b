"""One configuration, three places: the registry and the services' defaults, compose.yaml, and
the kind overlay must agree, and what each deployment gives a service must pass that service's
own `check-config`.

Run by `make test` (after the workspace tests, which build the service binaries it runs):
    python3 infra/deploy/test_drift.py

What it does, for every service in infra/services.toml:
- renders compose.yaml (`docker-compose config`) and the kind overlay (`kubectl kustomize`);
- takes the environment each gives the service's container, maps every `KEEL_*_FILE` secret
  path to the checked-in file behind it (a compose secret's `file:`, a kustomize
  secretGenerator's file), and runs `target/debug/<service> check-config` with exactly that
  environment (nothing inherited): it must exit 0;
- compares what the service would run with (check-config's effective values) and how the
  deployment wires it (published and container ports, probe paths, queue names, grace periods,
  each service on the broker as its own user) with the registry and the defaults.

Each rule is a function returning the problems it finds, so the `Bites` tests can break a copy
of a real render and show the rule naming the break; without them, a rule that never fires
would look the same as one that holds.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import tempfile
import re
import subprocess
import sys
import tomllib
import unittest
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
# Where the service binaries are: KEELDEV_BIN_DIRS (colon-separated, the first folder that has
# a service's binary wins; the scaffolding test puts its scratch build of the new service
# before this workspace's), else KEELDEV_BIN_DIR, else target/debug.
BIN_DIRS = [
    Path(d)
    for d in (
        os.environ.get("KEELDEV_BIN_DIRS")
        or os.environ.get("KEELDEV_BIN_DIR")
        or str(ROOT / "target" / "debug")
    ).split(":")
    if d
]


def binary(service: str) -> Path:
    """The service's binary: the first of BIN_DIRS that has it (the first folder if none does)."""
    return next((d / service for d in BIN_DIRS if (d / service).exists()), BIN_DIRS[0] / service)

REGISTRY = tomllib.loads((ROOT / "infra" / "services.toml").read_text())["service"]
SERVICES = {s["name"]: s for s in REGISTRY}

# The shutdown stages a grace period must cover (each service's [shutdown], check-config keys).
STAGES = ("drain_delay", "grace_period", "consumers", "workers", "relays", "broker", "pools")


def seconds(text: str) -> float:
    """A humantime-style duration as check-config prints it (`2s`, `500ms`, `1m`, `1m 30s`)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", str(text)):
        total += float(value) * units[unit]
    return total


def check_config(service: str, env: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """Runs the service's own check-config with `env` only; returns (code, values, stderr)."""
    clean = {"PATH": "/usr/bin:/bin", **env}
    proc = subprocess.run(
        [str(binary(service)), "check-config"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    values = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            values[key.strip()] = value.strip()
    return proc.returncode, values, proc.stderr.strip()


# --------------------------------------------------------------------------------- compose --


@functools.cache
def render_compose() -> dict:
    """`docker-compose config` of compose.yaml, with the checked-in defaults (no KEEL_* port
    or image overrides from the caller's environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "OTEL_"))}
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return yaml.safe_load(out)


def compose_env(rendered: dict, name: str) -> dict[str, str]:
    """The environment compose gives `name`, with secret paths mapped to their host files."""
    svc = rendered["services"][name]
    env = {k: "" if v is None else str(v) for k, v in (svc.get("environment") or {}).items()}
    files = {}
    for secret in svc.get("secrets") or []:
        source = secret["source"] if isinstance(secret, dict) else secret
        target = secret.get("target", source) if isinstance(secret, dict) else source
        path = target if target.startswith("/") else f"/run/secrets/{target}"
        files[path] = rendered["secrets"][source]["file"]
    for key, value in list(env.items()):
        if key.endswith("_FILE") and value in files:
            env[key] = files[value]
    return env


def container_ports(svc: dict) -> set[int]:
    """The container side of every published port (short or long syntax, as rendered)."""
    ports = set()
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p["target"]))
        else:
            ports.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def named_hosts(values: dict[str, str]) -> dict[str, str]:
    """The servers a service reaches by host name alone (`email.smtp_host`), by config key;
    listen addresses (`http.host`) are not among them."""
    return {k: v for k, v in values.items() if k.rsplit(".", 1)[-1].endswith("_host")}


def compose_problems(rendered: dict) -> list[str]:
    """Every way compose.yaml disagrees with the registry, the defaults or its own rules."""
    problems = []
    services = rendered["services"]
    for name, entry in SERVICES.items():
        if name not in services:
            problems.append(f"compose: {name} (in the registry) has no service")
            continue
        svc = services[name]
        env = compose_env(rendered, name)
        code, values, err = check_config(name, env)
        if code != 0:
            problems.append(f"compose: {name} check-config exited {code}: {err}")
            continue
        problems += wiring_problems("compose", name, entry, values)
        for key, host in named_hosts(values).items():
            if host not in services and host not in ("127.0.0.1", "localhost", "::1"):
                problems.append(f"compose: {name} {key} is {host}, which is no service here")
        # Published ports: the service's own, each on loopback by default.
        want = set(entry["ports"].values())
        if name == "billing":
            want.discard(entry["ports"]["grpc"])  # checkout's only, never published
        if container_ports(svc) != want:
            problems.append(f"compose: {name} publishes {sorted(container_ports(svc))}, registry ports {sorted(want)}")
        # Health: the service's own probe of its readiness on its HTTP port.
        test = " ".join((svc.get("healthcheck") or {}).get("test") or [])
        ready = f"http://127.0.0.1:{entry['ports']['http']}/readyz"
        if ready not in test:
            problems.append(f"compose: {name} healthcheck `{test}` does not probe {ready}")
        # A stop never cut short by the default 10 s SIGKILL: the stages must fit.
        stages = sum(seconds(values.get(f"shutdown.{s}", "0s")) for s in STAGES)
        grace = seconds(svc.get("stop_grace_period", "10s"))
        if grace < stages:
            problems.append(f"compose: {name} stop_grace_period {grace:g}s < its shutdown stages {stages:g}s")
        # Least privilege for the container (P46).
        if not svc.get("read_only"):
            problems.append(f"compose: {name} root filesystem is writable")
        if "ALL" not in (svc.get("cap_drop") or []):
            problems.append(f"compose: {name} keeps Linux capabilities")
        if "no-new-privileges:true" not in (svc.get("security_opt") or []):
            problems.append(f"compose: {name} allows privilege escalation")
        if entry.get("database"):
            problems += migrate_problems(rendered, name)
    # Every published port of every service, Keel's or not, binds to loopback by default.
    for name, svc in services.items():
        for p in svc.get("ports") or []:
            host_ip = p.get("host_ip") if isinstance(p, dict) else str(p).split(":")[0]
            if host_ip != "127.0.0.1":
                problems.append(f"compose: {name} publishes {p} beyond 127.0.0.1")
    # The one-shot that creates roles and databases serves exactly the registry's databases.
    wanted = sorted(n for n, e in SERVICES.items() if e.get("database"))
    listed = sorted(
        s for s in str(services["db-init"]["environment"]["KEEL_DB_SERVICES"]).split(",") if s
    )
    if listed != wanted:
        problems.append(f"compose: db-init creates databases for {listed}, the registry has {wanted}")
    return problems


def migrate_problems(rendered: dict, name: str) -> list[str]:
    """A service with a database has a one-shot `<name>-migrate` that runs before it."""
    services = rendered["services"]
    migrate = services.get(f"{name}-migrate")
    if migrate is None:
        return [f"compose: {name} has a database but no {name}-migrate one-shot"]
    problems = []
    if migrate.get("command") != ["migrate", "--wait", "60s"]:
        problems.append(f"compose: {name}-migrate runs {migrate.get('command')}")
    after = services[name].get("depends_on") or {}
    if (after.get(f"{name}-migrate") or {}).get("condition") != "service_completed_successfully":
        problems.append(f"compose: {name} does not wait for {name}-migrate to complete")
    code, _, err = check_config(name, compose_env(rendered, f"{name}-migrate"))
    if code != 0:
        problems.append(f"compose: {name}-migrate check-config exited {code}: {err}")
    return problems


# ------------------------------------------------------------------------------------ kind --

KUBECTL = os.environ.get("KEELDEV_KUBECTL") or str(ROOT / ".keel" / "venv" / "bin" / "kubectl")


@functools.cache
def render_kind() -> list[dict]:
    """`kubectl kustomize k8s/overlays/kind`: what `kubectl apply -k` would send."""
    kubectl = KUBECTL if Path(KUBECTL).exists() else "kubectl"
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / "kind")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    return next(
        (d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None
    )


def pod_env(docs: list[dict], pod: dict, container: dict, scratch: Path) -> dict[str, str]:
    """A container's environment, its mounted Secrets' keys written to `scratch` and every
    `*_FILE` path that points into a mount mapped to the written file."""
    env = {e["name"]: str(e.get("value", "")) for e in container.get("env") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    files = {}
    for mount in container.get("volumeMounts") or []:
        secret = (volumes.get(mount["name"]) or {}).get("secret")
        if not secret:
            continue
        obj = find(docs, "Secret", secret["secretName"])
        if obj is None:
            continue
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        for key, value in data.items():
            path = scratch / secret["secretName"] / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(value)
            files[f"{mount['mountPath'].rstrip('/')}/{key}"] = str(path)
    for key, value in list(env.items()):
        if key.endswith("_FILE") and value in files:
            env[key] = files[value]
    return env


def kind_problems(docs: list[dict]) -> list[str]:
    """Every way the rendered kind overlay disagrees with the registry, the defaults and each
    service's own check-config."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name, entry in SERVICES.items():
            deployment = find(docs, "Deployment", name)
            if deployment is None:
                problems.append(f"kind: {name} (in the registry) has no Deployment")
                continue
            pod = deployment["spec"]["template"]["spec"]
            container = next((c for c in pod["containers"] if c["name"] == name), None)
            if container is None:
                problems.append(f"kind: {name} Deployment has no container called {name}")
                continue
            code, values, err = check_config(name, pod_env(docs, pod, container, scratch))
            if code != 0:
                problems.append(f"kind: {name} check-config exited {code}: {err}")
                continue
            problems += wiring_problems("kind", name, entry, values)
            for key, host in named_hosts(values).items():
                if host not in ("127.0.0.1", "localhost", "::1") and find(docs, "Service", host.split(".")[0]) is None:
                    problems.append(f"kind: {name} {key} is {host}, which is no Service here")
            # Container ports: the registry's, except the admin listener, loopback only.
            want = {p for k, p in entry["ports"].items() if k != "admin"}
            have = {p["containerPort"] for p in container.get("ports") or []}
            if have != want:
                problems.append(f"kind: {name} container ports {sorted(have)}, registry {sorted(want)}")
            named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
            for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
                get = (container.get(probe) or {}).get("httpGet") or {}
                port = named.get(get.get("port"), get.get("port"))
                if get.get("path") != path or port != entry["ports"]["http"]:
                    problems.append(
                        f"kind: {name} {probe} is {get.get('path')} on {get.get('port')}, "
                        f"expected {path} on {entry['ports']['http']}"
                    )
            stages = sum(seconds(values.get(f"shutdown.{s}", "0s")) for s in STAGES)
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if grace < stages:
                problems.append(f"kind: {name} terminationGracePeriodSeconds {grace} < its shutdown stages {stages:g}s")
            if entry.get("database"):
                job = find(docs, "Job", f"{name}-migrate")
                if job is None:
                    problems.append(f"kind: {name} has a database but no {name}-migrate Job")
                else:
                    jpod = job["spec"]["template"]["spec"]
                    jc = jpod["containers"][0]
                    if jc.get("args") != ["migrate", "--wait", "60s"]:
                        problems.append(f"kind: {name}-migrate runs {jc.get('args')}")
                    code, _, err = check_config(name, pod_env(docs, jpod, jc, scratch))
                    if code != 0:
                        problems.append(f"kind: {name}-migrate check-config exited {code}: {err}")
            # What scales on a queue scales on one the service consumes.
            for obj in docs:
                if obj["kind"] != "ScaledObject" or obj["spec"]["scaleTargetRef"]["name"] != name:
                    continue
                for trigger in obj["spec"].get("triggers") or []:
                    queue = (trigger.get("metadata") or {}).get("queueName")
                    if queue is not None and queue not in entry.get("consumes", []):
                        problems.append(f"kind: {name} scales on queue {queue}, which it does not consume")
    return problems


# ------------------------------------------------------------------------------ both places --


def wiring_problems(place: str, name: str, entry: dict, values: dict[str, str]) -> list[str]:
    """What check-config says the service will run with, against the registry's conventions."""
    problems = []
    for kind, port in entry["ports"].items():
        key = {"http": "http.port", "grpc": "grpc.port", "admin": "admin.port"}.get(kind)
        if key and values.get(key) != str(port):
            problems.append(f"{place}: {name} {key} = {values.get(key)}, registry {kind} port {port}")
    # Inside a container, loopback is the container itself: a dependency's URL that still
    # says 127.0.0.1 (a default, or the dev profile's) reaches nothing.
    for key, value in values.items():
        if "://" in value and urlsplit(value).hostname in ("127.0.0.1", "localhost", "::1"):
            problems.append(f"{place}: {name} {key} points at loopback ({value})")
    for key, value in named_hosts(values).items():
        if value in ("127.0.0.1", "localhost", "::1"):
            problems.append(f"{place}: {name} {key} points at loopback ({value})")
    if values.get("http.host") not in ("0.0.0.0", "::"):
        problems.append(f"{place}: {name} listens on {values.get('http.host')}: unreachable from outside its container")
    if entry.get("database"):
        for key, (user, port) in {
            "database.url": (f"{name}_app", 6432),
            "database.migrate_url": (f"{name}_owner", 5432),
        }.items():
            url = urlsplit(values.get(key, ""))
            if url.path.lstrip("/") != f"keel_{name}" or url.username != user or url.port != port:
                problems.append(
                    f"{place}: {name} {key} is {url.username}@:{url.port}/{url.path.lstrip('/')}, "
                    f"the conventions say {user}@:{port}/keel_{name}"
                )
    if entry.get("broker"):
        url = urlsplit(values.get("amqp.url", ""))
        if url.path.lstrip("/") != "keel":
            problems.append(f"{place}: {name} amqp.url vhost is `{url.path.lstrip('/')}`, not keel")
        # Least privilege: each service is its own RabbitMQ user, whose permissions in
        # infra/rabbitmq/definitions.json cover its own queues and routing keys only.
        if url.username != name:
            problems.append(f"{place}: {name} amqp.url user is `{url.username}`, not its own `{name}`")
    return problems


# ----------------------------------------------------------------------------------- tests --


class Checks(unittest.TestCase):
    """Renders are cached per run (render_compose/render_kind): every test reads the same one,
    and a test that breaks it breaks a deep copy."""

    def assert_named(self, problems: list[str], *words: str):
        self.assertTrue(
            any(all(w in p for w in words) for p in problems),
            f"no problem names {words}: {problems}",
        )


class Compose(Checks):
    rendered: dict

    @classmethod
    def setUpClass(cls):
        cls.rendered = render_compose()

    def test_compose_agrees_with_the_registry_the_defaults_and_check_config(self):
        self.assertEqual(compose_problems(self.rendered), [])


class Kind(Checks):
    docs: list[dict]

    @classmethod
    def setUpClass(cls):
        cls.docs = render_kind()

    def test_the_kind_overlay_agrees_with_the_registry_the_defaults_and_check_config(self):
        self.assertEqual(kind_problems(self.docs), [])

    def broken(self, change) -> list[str]:
        docs = copy.deepcopy(self.docs)
        change(docs)
        return kind_problems(docs)

    def container(self, docs, name):
        return find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]

    def test_bites_a_readiness_probe_on_the_wrong_path(self):
        def change(docs):
            self.container(docs, "checkout")["readinessProbe"]["httpGet"]["path"] = "/livez"
        self.assert_named(self.broken(change), "checkout readinessProbe")

    def test_bites_an_environment_check_config_refuses(self):
        def change(docs):
            self.container(docs, "billing")["env"].append({"name": "KEEL_GRPC__PORTT", "value": "1"})
        self.assert_named(self.broken(change), "billing check-config exited 78")

    def test_bites_a_port_off_the_registry(self):
        def change(docs):
            for e in self.container(docs, "notification")["env"]:
                if e["name"] == "KEEL_HTTP__PORT":
                    e["value"] = "9082"
        self.assert_named(self.broken(change), "notification http.port = 9082")

    def test_bites_a_mail_server_left_on_loopback(self):
        def change(docs):
            env = self.container(docs, "notification")["env"]
            env[:] = [e for e in env if e["name"] != "KEEL_EMAIL__SMTP_HOST"]
        self.assert_named(self.broken(change), "notification email.smtp_host points at loopback")

    def test_bites_a_grace_period_shorter_than_the_stages(self):
        def change(docs):
            find(docs, "Deployment", "psp-sim")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
        self.assert_named(self.broken(change), "psp-sim terminationGracePeriodSeconds")

    def test_bites_a_service_connecting_as_another_services_broker_user(self):
        def change(docs):
            spec = find(docs, "Deployment", "notification")["spec"]["template"]["spec"]
            secrets = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
            secret = find(docs, "Secret", secrets[0])
            secret["data"]["amqp-url"] = base64.b64encode(
                b"amqp://checkout:checkout_dev@rabbitmq:5672/keel").decode()
        self.assert_named(self.broken(change), "notification amqp.url user is `checkout`")

    def test_bites_scaling_on_a_queue_not_consumed(self):
        def change(docs):
            so = next(d for d in docs if d["kind"] == "ScaledObject")
            so["spec"]["triggers"][0]["metadata"]["queueName"] = "checkout.events"
        self.assert_named(self.broken(change), "scales on queue checkout.events")


class Bites(Checks):
    """Each rule, shown to fire on a copy of the real render broken in one way."""

    @classmethod
    def setUpClass(cls):
        cls.rendered = render_compose()

    def broken(self, change) -> list[str]:
        copy_ = copy.deepcopy(self.rendered)
        change(copy_)
        return compose_problems(copy_)

    def test_a_port_off_the_registry(self):
        def change(r):
            r["services"]["checkout"]["environment"]["KEEL_HTTP__PORT"] = "9999"
        self.assert_named(self.broken(change), "checkout", "http.port = 9999")

    def test_an_unknown_key_fails_check_config(self):
        def change(r):
            r["services"]["billing"]["environment"]["KEEL_PSP__BASE_ULR"] = "http://psp-sim:8090"
        self.assert_named(self.broken(change), "billing check-config exited 78")

    def test_a_secret_the_service_does_not_get(self):
        def change(r):
            del r["services"]["notification"]["environment"]["KEEL_DATABASE__URL_FILE"]
        # KEEL_PROFILE=dev fills it with the dev profile's URL, on loopback: reachable from no
        # container.
        self.assert_named(self.broken(change), "notification database.url points at loopback")

    def test_the_wrong_database(self):
        def change(r):
            r["secrets"]["billing_database_url"]["file"] = r["secrets"]["checkout_database_url"]["file"]
        self.assert_named(self.broken(change), "billing database.url", "keel_billing")

    def test_another_services_broker_user(self):
        def change(r):
            r["secrets"]["billing_amqp_url"]["file"] = r["secrets"]["checkout_amqp_url"]["file"]
        self.assert_named(self.broken(change), "billing amqp.url user is `checkout`")

    def test_a_port_published_beyond_loopback(self):
        def change(r):
            r["services"]["psp-sim"]["ports"][1] = {"target": 8091, "published": 8091, "host_ip": "0.0.0.0"}
        self.assert_named(self.broken(change), "psp-sim", "beyond 127.0.0.1")

    def test_a_dependency_published_beyond_loopback(self):
        def change(r):
            r["services"]["postgres"]["ports"] = [{"target": 5432, "published": 5432, "host_ip": "0.0.0.0"}]
        self.assert_named(self.broken(change), "postgres", "beyond 127.0.0.1")

    def test_a_health_check_on_the_wrong_port(self):
        def change(r):
            r["services"]["notification"]["healthcheck"]["test"] = [
                "CMD", "/usr/local/bin/service", "probe", "http://127.0.0.1:8080/readyz"]
        self.assert_named(self.broken(change), "notification healthcheck")

    def test_a_dependency_left_on_its_default_address(self):
        def change(r):
            del r["services"]["checkout"]["environment"]["KEEL_BILLING__GRPC_URL"]
        self.assert_named(self.broken(change), "checkout billing.grpc_url points at loopback")

    def test_a_mail_server_left_on_loopback(self):
        def change(r):
            del r["services"]["notification"]["environment"]["KEEL_EMAIL__SMTP_HOST"]
        self.assert_named(self.broken(change), "notification email.smtp_host points at loopback")

    def test_a_mail_server_that_is_not_in_the_file(self):
        def change(r):
            del r["services"]["mailpit"]
        self.assert_named(self.broken(change), "notification email.smtp_host is mailpit, which is no service")

    def test_a_grace_period_shorter_than_the_stages(self):
        def change(r):
            r["services"]["psp-sim"]["stop_grace_period"] = "10s"
        self.assert_named(self.broken(change), "psp-sim stop_grace_period")

    def test_a_writable_root_filesystem(self):
        def change(r):
            r["services"]["checkout"]["read_only"] = False
        self.assert_named(self.broken(change), "checkout root filesystem")

    def test_a_service_missing_from_db_init(self):
        def change(r):
            r["services"]["db-init"]["environment"]["KEEL_DB_SERVICES"] = "checkout,billing"
        self.assert_named(self.broken(change), "db-init", "notification")

    def test_a_service_started_before_its_migration(self):
        def change(r):
            del r["services"]["billing"]["depends_on"]["billing-migrate"]
        self.assert_named(self.broken(change), "billing does not wait for billing-migrate")


if __name__ == "__main__":
    missing = [s for s in SERVICES if not binary(s).exists()]
    if missing:
        where = ", ".join(str(d) for d in BIN_DIRS)
        sys.exit(f"test_drift: build the services first (missing {', '.join(missing)} in {where})")
    unittest.main(verbosity=2)
