"""The proof that infra/k8s/policy.py bites (P40, P41, P46), and that the manifests agree with
the rest of the repository.

The kind overlay, rendered as `kubectl apply -k` would send it, passes every rule. Then each
test breaks one thing in a copy, the way a careless edit would (a readiness probe dropped,
runAsNonRoot removed, a PodDisruptionBudget deleted, a port opened), and asserts the policy
rejects it, naming the rule and the object. A rule no test can make fail is a rule that checks
nothing.

    python -m unittest discover -s infra/k8s -p 'test_*.py'    # infra/k8s/check.sh runs this

KEEL_K8S_RENDERED=<file> reuses a rendering (check.sh passes the one it validated); without it
the overlay is rendered here with kubectl. Standard library, PyYAML and policy.py only.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import tomllib
import unittest
from pathlib import Path
from typing import Any, Callable

import yaml

import policy

ROOT = Path(__file__).resolve().parents[2]
KIND = ROOT / "k8s" / "overlays" / "kind"


def render_kind() -> list[dict[str, Any]]:
    path = os.environ.get("KEEL_K8S_RENDERED")
    if path:
        return policy.load([path])
    venv_kubectl = ROOT / ".keel" / "venv" / "bin" / "kubectl"
    kubectl = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("no kubectl: run infra/k8s/check.sh, which installs one")
    out = subprocess.run([kubectl, "kustomize", str(KIND)], check=True, capture_output=True,
                         text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for obj in docs:
        if obj.get("kind") == kind and obj["metadata"]["name"] == name:
            return obj
    raise KeyError(f"{kind}/{name} is not in the rendered overlay")


def remove(docs: list[dict[str, Any]], kind: str, name: str) -> None:
    docs.remove(find(docs, kind, name))


def pod(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return find(docs, kind, name)["spec"]["template"]["spec"]


def main_container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return pod(docs, "Deployment", name)["containers"][0]


def registry() -> list[dict[str, Any]]:
    with open(ROOT / "infra" / "services.toml", "rb") as f:
        return tomllib.load(f)["service"]


DEFINITIONS = ROOT / "infra" / "rabbitmq" / "definitions.json"


def broker_definitions_problems(docs: list[dict[str, Any]]) -> list[str]:
    """How the kind RabbitMQ would fail to load infra/rabbitmq/definitions.json at boot (its
    users, permissions and topology): the `load_definitions` its conf.d files set must name a
    key of a Secret (the file holds password hashes) mounted at that directory, and the key
    must hold the generated file byte for byte."""
    spec = pod(docs, "Deployment", "rabbitmq")
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts = container.get("volumeMounts") or []

    def generated(kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in docs if o.get("kind") == kind
                     and o["metadata"]["name"] == name), None)

    conf = []
    for m in mounts:
        source = (volumes.get(m["name"]) or {}).get("configMap")
        if not m["mountPath"].startswith("/etc/rabbitmq/conf.d/") or source is None:
            continue
        data = (generated("ConfigMap", source["name"]) or {}).get("data") or {}
        conf.append(data.get(m.get("subPath") or "", ""))
    paths = re.findall(r"^\s*load_definitions\s*=\s*(\S+)", "\n".join(conf), re.MULTILINE)
    if len(paths) != 1:
        return [f"Deployment/rabbitmq: conf.d sets load_definitions {len(paths)} times, not once"]
    directory, _, key = paths[0].rpartition("/")
    mount = next((m for m in mounts if m["mountPath"].rstrip("/") == directory), None)
    if mount is None:
        return [f"Deployment/rabbitmq: nothing is mounted at {directory}, where load_definitions "
                f"= {paths[0]} points"]
    secret_ref = (volumes.get(mount["name"]) or {}).get("secret")
    if secret_ref is None:
        return [f"Deployment/rabbitmq: {directory} is not a Secret (the definitions hold "
                f"password hashes)"]
    for item in secret_ref.get("items") or []:
        if item["path"] == key:
            key = item["key"]
    secret = generated("Secret", secret_ref["secretName"]) or {}
    data = secret.get("data") or {}
    if key not in data:
        return [f"Deployment/rabbitmq: Secret {secret_ref['secretName']} has no key {key!r} "
                f"for load_definitions = {paths[0]}"]
    if base64.b64decode(data[key]) != DEFINITIONS.read_bytes():
        return [f"Deployment/rabbitmq: {paths[0]} differs from infra/rabbitmq/definitions.json"]
    return []


class PolicyBites(unittest.TestCase):
    docs: list[dict[str, Any]]

    @classmethod
    def setUpClass(cls) -> None:
        cls.docs = render_kind()

    def violations_after(self, change: Callable[[list[dict[str, Any]]], None]) -> list[policy.Violation]:
        docs = copy.deepcopy(self.docs)
        change(docs)
        return policy.check(docs)

    def assert_rejected(self, change: Callable[[list[dict[str, Any]]], None], rule: str,
                        obj: str, container: str | None = None) -> None:
        found = self.violations_after(change)
        self.assertTrue(
            any(v.rule == rule and v.obj == obj and (container is None or v.container == container)
                for v in found),
            f"expected `{rule}` on {obj}{' container ' + container if container else ''}, got:\n"
            + "\n".join(str(v) for v in found))
        # Every message names the rule and the object, as a reader of check.sh's output needs.
        for v in found:
            self.assertIn(v.rule, policy.RULES)
            self.assertTrue(str(v).startswith(f"{v.rule}: {v.obj}"))

    # -- the baseline ---------------------------------------------------------------------------

    def test_the_kind_overlay_meets_every_rule(self) -> None:
        self.assertEqual([str(v) for v in policy.check(self.docs)], [])

    # -- probes (P21) ---------------------------------------------------------------------------

    def test_a_container_without_a_readiness_probe_is_rejected(self) -> None:
        self.assert_rejected(lambda d: main_container(d, "checkout").pop("readinessProbe"),
                             "probes", "Deployment/checkout", "checkout")

    def test_a_container_without_a_startup_probe_is_rejected(self) -> None:
        self.assert_rejected(lambda d: main_container(d, "billing").pop("startupProbe"),
                             "probes", "Deployment/billing", "billing")

    def test_a_dependency_without_a_liveness_probe_is_rejected(self) -> None:
        self.assert_rejected(lambda d: main_container(d, "postgres").pop("livenessProbe"),
                             "probes", "Deployment/postgres", "postgres")

    def test_a_liveness_probe_on_readyz_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            main_container(d, "notification")["livenessProbe"]["httpGet"]["path"] = "/readyz"
        self.assert_rejected(change, "liveness-not-readyz", "Deployment/notification")

    # -- the restricted profile and more (P46) ----------------------------------------------------

    def test_a_pod_that_may_run_as_root_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            spec = pod(d, "Deployment", "checkout")
            del spec["securityContext"]["runAsNonRoot"]
            for c in spec["initContainers"] + spec["containers"]:
                del c["securityContext"]["runAsNonRoot"]
        self.assert_rejected(change, "run-as-non-root", "Deployment/checkout", "checkout")

    def test_running_as_user_zero_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            pod(d, "Deployment", "psp-sim")["securityContext"]["runAsUser"] = 0
        self.assert_rejected(change, "run-as-user", "Deployment/psp-sim", "psp-sim")

    def test_a_writable_root_filesystem_in_an_init_container_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            init = pod(d, "Deployment", "billing")["initContainers"][0]
            init["securityContext"]["readOnlyRootFilesystem"] = False
        self.assert_rejected(change, "read-only-root-fs", "Deployment/billing", "migrate")

    def test_privilege_escalation_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            c = pod(d, "Job", "checkout-migrate")["containers"][0]
            del c["securityContext"]["allowPrivilegeEscalation"]
        self.assert_rejected(change, "no-privilege-escalation", "Job/checkout-migrate", "migrate")

    def test_a_kept_or_added_capability_is_rejected(self) -> None:
        def keep(d: list[dict[str, Any]]) -> None:
            main_container(d, "pgbouncer")["securityContext"]["capabilities"]["drop"] = ["NET_RAW"]
        self.assert_rejected(keep, "drop-all-capabilities", "Deployment/pgbouncer", "pgbouncer")

        def add(d: list[dict[str, Any]]) -> None:
            main_container(d, "checkout")["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
        self.assert_rejected(add, "drop-all-capabilities", "Deployment/checkout", "checkout")

    def test_a_pod_without_a_seccomp_profile_is_rejected(self) -> None:
        self.assert_rejected(
            lambda d: pod(d, "Deployment", "rabbitmq")["securityContext"].pop("seccompProfile"),
            "seccomp", "Deployment/rabbitmq", "rabbitmq")

    def test_host_access_is_rejected(self) -> None:
        def host_path(d: list[dict[str, Any]]) -> None:
            pod(d, "Deployment", "redis")["volumes"].append(
                {"name": "host", "hostPath": {"path": "/var/run"}})
        self.assert_rejected(host_path, "pss-restricted", "Deployment/redis")
        self.assert_rejected(lambda d: pod(d, "Deployment", "billing").update(hostNetwork=True),
                             "pss-restricted", "Deployment/billing")

    def test_a_mounted_service_account_token_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            del pod(d, "Deployment", "notification")["automountServiceAccountToken"]
            find(d, "ServiceAccount", "notification")["automountServiceAccountToken"] = True
        self.assert_rejected(change, "no-sa-token", "Deployment/notification")

    def test_a_container_without_limits_is_rejected(self) -> None:
        self.assert_rejected(
            lambda d: pod(d, "Job", "billing-migrate")["containers"][0]["resources"].pop("limits"),
            "resources", "Job/billing-migrate", "migrate")

    def test_an_unpinned_image_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            main_container(d, "redis")["image"] = "redis"
        self.assert_rejected(change, "image-pinned", "Deployment/redis", "redis")

    # -- rollouts and stops (P20) ---------------------------------------------------------------

    def test_a_rollout_that_drops_capacity_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "Deployment", "billing")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = 1
        self.assert_rejected(change, "rolling-update", "Deployment/billing")

    def test_recreate_without_its_stated_reason_is_rejected(self) -> None:
        # psp-sim's Recreate is allowed only with the annotation that says why, on one replica.
        def change(d: list[dict[str, Any]]) -> None:
            del find(d, "Deployment", "psp-sim")["metadata"]["annotations"]["keel.dev/recreate-because"]
        self.assert_rejected(change, "rolling-update", "Deployment/psp-sim")

    def test_recreate_of_a_service_with_replicas_to_spare_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            dep = find(d, "Deployment", "billing")
            dep["spec"]["strategy"] = {"type": "Recreate"}
            dep["metadata"].setdefault("annotations", {})["keel.dev/recreate-because"] = "no reason"
        self.assert_rejected(change, "rolling-update", "Deployment/billing")

    def test_a_grace_period_shorter_than_the_shutdown_stages_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            pod(d, "Deployment", "checkout")["terminationGracePeriodSeconds"] = 20
        self.assert_rejected(change, "grace-period", "Deployment/checkout")

    def test_a_longer_drain_delay_must_come_with_a_longer_grace_period(self) -> None:
        # 28 s of stages + 8 s more drain = 36 s > checkout's 33 s.
        def change(d: list[dict[str, Any]]) -> None:
            main_container(d, "checkout")["env"].append(
                {"name": "KEEL_SHUTDOWN__DRAIN_DELAY", "value": "10s"})
        self.assert_rejected(change, "grace-period", "Deployment/checkout")

    # -- replicas, autoscaling and disruption budgets (P40, P41) ----------------------------------

    def test_a_multi_replica_deployment_without_a_pdb_is_rejected(self) -> None:
        self.assert_rejected(lambda d: remove(d, "PodDisruptionBudget", "billing"),
                             "pdb", "Deployment/billing")

    def test_an_autoscaled_deployment_without_a_pdb_is_rejected(self) -> None:
        # checkout sets no replicas: only its HPA's maxReplicas makes it multi-replica.
        self.assert_rejected(lambda d: remove(d, "PodDisruptionBudget", "checkout"),
                             "pdb", "Deployment/checkout")
        self.assert_rejected(lambda d: remove(d, "PodDisruptionBudget", "notification"),
                             "pdb", "Deployment/notification")

    def test_a_pdb_that_allows_no_eviction_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "PodDisruptionBudget", "checkout")["spec"]["maxUnavailable"] = 0
        self.assert_rejected(change, "pdb-allows-eviction", "PodDisruptionBudget/checkout")

    def test_replicas_on_an_autoscaled_deployment_are_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "Deployment", "checkout")["spec"]["replicas"] = 2
        self.assert_rejected(change, "replicas-owned-by-autoscaler", "Deployment/checkout")

    def test_an_autoscaler_without_its_deployment_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "ScaledObject", "notification")["spec"]["scaleTargetRef"]["name"] = "notifications"
        self.assert_rejected(change, "autoscaler-target", "ScaledObject/notification")

    # -- namespace and network (P46) --------------------------------------------------------------

    def test_a_namespace_that_does_not_enforce_restricted_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            labels = find(d, "Namespace", "keel")["metadata"]["labels"]
            labels["pod-security.kubernetes.io/enforce"] = "baseline"
        self.assert_rejected(change, "namespace-restricted", "Namespace/keel")
        self.assert_rejected(lambda d: remove(d, "Namespace", "keel"),
                             "namespace-restricted", "Namespace/keel")

    def test_an_extra_port_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "NetworkPolicy", "checkout")["spec"]["ingress"][0]["ports"].append(
                {"protocol": "TCP", "port": 9090})
        self.assert_rejected(change, "netpol-journey", "NetworkPolicy/checkout")

    def test_a_path_outside_the_journey_is_rejected(self) -> None:
        # notification may reach pgbouncer, not billing's gRPC port.
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "NetworkPolicy", "notification")["spec"]["egress"].append(
                {"to": [{"podSelector": {"matchLabels": {policy.NAME_LABEL: "billing"}}}],
                 "ports": [{"protocol": "TCP", "port": 50051}]})
        self.assert_rejected(change, "netpol-journey", "NetworkPolicy/notification")

    def test_egress_to_anywhere_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "NetworkPolicy", "psp-sim")["spec"]["egress"].append(
                {"ports": [{"protocol": "TCP", "port": 443}]})
        self.assert_rejected(change, "netpol-journey", "NetworkPolicy/psp-sim")

    def test_a_rule_without_ports_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            del find(d, "NetworkPolicy", "rabbitmq")["spec"]["ingress"][0]["ports"]
        self.assert_rejected(change, "netpol-journey", "NetworkPolicy/rabbitmq")

    def test_a_pod_without_a_default_deny_is_rejected(self) -> None:
        found = self.violations_after(lambda d: remove(d, "NetworkPolicy", "default-deny"))
        denied = {v.obj for v in found if v.rule == "default-deny"}
        # Every workload, the dependencies and Jobs included.
        self.assertEqual(denied, {w.ref for w in policy.workloads(self.docs)})

    def test_a_pod_claiming_a_database_it_has_not_is_rejected(self) -> None:
        # The dependencies admit pods by label: psp-sim has no database in the registry, so a
        # label that says otherwise opens a path no journey has.
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "Deployment", "psp-sim")["spec"]["template"]["metadata"]["labels"][
                "keel.dev/database"] = "true"
        self.assert_rejected(change, "netpol-journey", "NetworkPolicy/pgbouncer")

    def test_a_journey_path_closed_at_one_end_is_rejected(self) -> None:
        # The provider's webhook: psp-sim may send, billing no longer receives.
        def change(d: list[dict[str, Any]]) -> None:
            ingress = find(d, "NetworkPolicy", "billing")["spec"]["ingress"]
            ingress[:] = [r for r in ingress if r["ports"][0]["port"] != 8081]
        self.assert_rejected(change, "journey-blocked", "Deployment/billing")

    # -- references -------------------------------------------------------------------------------

    def test_a_secret_file_the_secret_does_not_hold_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            for e in main_container(d, "billing")["env"]:
                if e["name"] == "KEEL_WEBHOOK__SECRETS_FILE":
                    e["value"] = "/run/secrets/keel/webhook-secret"
        self.assert_rejected(change, "secret-reference", "Deployment/billing", "billing")

    def test_a_keda_secret_key_that_does_not_exist_is_rejected(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            find(d, "TriggerAuthentication", "notification-rabbitmq")["spec"]["secretTargetRef"][0]["key"] = "amqp"
        self.assert_rejected(change, "secret-reference",
                             "TriggerAuthentication/notification-rabbitmq")


class ManifestsAgreeWithTheRepository(unittest.TestCase):
    """What no schema knows: the manifests against the registry, the services' configuration
    and the other files they copy or mirror."""

    docs: list[dict[str, Any]]

    @classmethod
    def setUpClass(cls) -> None:
        cls.docs = render_kind()

    def test_every_registered_service_runs_with_its_ports(self) -> None:
        for svc in registry():
            spec = pod(self.docs, "Deployment", svc["name"])
            ports = {p["containerPort"] for p in spec["containers"][0].get("ports", [])}
            env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
            for kind, port in svc["ports"].items():
                self.assertEqual(env.get(f"KEEL_{kind.upper()}__PORT"), str(port), svc["name"])
                # Every port but psp-sim's loopback-only admin is one the pod serves.
                if kind != "admin":
                    self.assertIn(port, ports, f"{svc['name']} {kind}")

    def test_every_service_with_a_database_migrates_before_it_serves(self) -> None:
        with_db = {s["name"] for s in registry() if s.get("database")}
        for svc in registry():
            spec = pod(self.docs, "Deployment", svc["name"])
            gates = [c for c in spec.get("initContainers", []) if c["name"] == "migrate"]
            jobs = [o for o in self.docs if o["kind"] == "Job"
                    and o["metadata"]["name"] == f"{svc['name']}-migrate"]
            if svc["name"] in with_db:
                self.assertEqual(len(gates), 1, svc["name"])
                self.assertEqual(gates[0]["args"][:2], ["migrate", "--wait"])
                self.assertEqual(len(jobs), 1, svc["name"])
                job_container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
                self.assertEqual(job_container["args"], gates[0]["args"])
                self.assertEqual(job_container["image"], spec["containers"][0]["image"])
            else:
                self.assertEqual((gates, jobs), ([], []), svc["name"])

    def test_every_keel_variable_names_a_configuration_key(self) -> None:
        # A misspelt KEEL_PSP__BASEURL would be ignored by no schema and refused only at start.
        for svc in registry():
            config = ROOT / "services" / svc["name"] / "config"
            keys: set[str] = set()
            for file in ("default.toml", "dev.toml"):
                with open(config / file, "rb") as f:
                    for section, table in tomllib.load(f).items():
                        keys.update(f"{section}.{key}" for key in table)
            spec = pod(self.docs, "Deployment", svc["name"])
            for c in spec.get("initContainers", []) + spec["containers"]:
                for e in c["env"]:
                    name = e["name"]
                    if name == "KEEL_PROFILE" or not name.startswith("KEEL_"):
                        continue
                    key = re.sub(r"_FILE$", "", name[len("KEEL_"):]).lower().replace("__", ".")
                    self.assertIn(key, keys, f"{svc['name']}: {name}")

    def test_the_kind_postgres_runs_the_dev_stacks_init(self) -> None:
        copy_ = KIND / "dependencies" / "postgres" / "init.sql"
        self.assertEqual(copy_.read_bytes(), (ROOT / "infra" / "postgres" / "init.sql").read_bytes(),
                         f"{copy_} differs from infra/postgres/init.sql: copy it again")
        script = (KIND / "dependencies" / "postgres" / "10-keel-roles.sh").read_text()
        listed = re.search(r"-v services=(\S+)", script)
        self.assertIsNotNone(listed)
        assert listed is not None
        self.assertEqual(set(listed.group(1).split(",")), set(policy.DATABASE_SERVICES))

    def test_the_kind_rabbitmq_loads_the_generated_definitions(self) -> None:
        copy_ = KIND / "dependencies" / "rabbitmq" / "definitions.json"
        self.assertEqual(copy_.read_bytes(), DEFINITIONS.read_bytes(),
                         f"{copy_} differs from infra/rabbitmq/definitions.json: "
                         "run `make rabbitmq-definitions`, which rewrites both")
        self.assertEqual(broker_definitions_problems(self.docs), [])

    def assert_definitions_broken(self, change: Callable[[list[dict[str, Any]]], None],
                                  *words: str) -> None:
        docs = copy.deepcopy(self.docs)
        change(docs)
        problems = broker_definitions_problems(docs)
        self.assertTrue(any(all(w in p for w in words) for p in problems),
                        f"no problem names {words}: {problems}")

    def test_bites_a_broker_that_loads_no_definitions(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            for cm in d:
                if cm["kind"] == "ConfigMap" and "90-keel.conf" in cm.get("data", {}):
                    cm["data"]["90-keel.conf"] = re.sub(r"(?m)^load_definitions.*$", "",
                                                        cm["data"]["90-keel.conf"])
        self.assert_definitions_broken(change, "load_definitions 0 times")

    def test_bites_definitions_not_mounted_where_the_config_says(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            for m in pod(d, "Deployment", "rabbitmq")["containers"][0]["volumeMounts"]:
                if m["mountPath"] == "/run/secrets/keel":
                    m["mountPath"] = "/run/secrets/rabbitmq"
        self.assert_definitions_broken(change, "nothing is mounted at /run/secrets/keel")

    def test_bites_definitions_that_differ_from_the_generated_file(self) -> None:
        def change(d: list[dict[str, Any]]) -> None:
            for o in d:
                if o["kind"] == "Secret" and "definitions.json" in o.get("data", {}):
                    o["data"]["definitions.json"] = base64.b64encode(b'{"users": []}').decode()
        self.assert_definitions_broken(change, "differs from infra/rabbitmq/definitions.json")

    def test_kind_publishes_checkouts_node_port_on_the_hosts_8080(self) -> None:
        with open(ROOT / "k8s" / "kind-cluster.yaml", encoding="utf-8") as f:
            cluster = yaml.safe_load(f)
        mappings = [m for n in cluster["nodes"] for m in n.get("extraPortMappings", [])]
        node_port = find(self.docs, "Service", "checkout")["spec"]["ports"][0]["nodePort"]
        self.assertIn({"containerPort": node_port, "hostPort": 8080,
                       "listenAddress": "127.0.0.1", "protocol": "TCP"}, mappings)

    def test_every_dependency_is_marked_dev_only(self) -> None:
        for w in policy.workloads(self.docs):
            if w.labels.get("app.kubernetes.io/component") == "dependency":
                self.assertEqual(w.labels.get("keel.dev/dev-only"), "true", w.ref)
                self.assertEqual(w.obj["metadata"]["labels"].get("keel.dev/dev-only"), "true",
                                 w.ref)


if __name__ == "__main__":
    unittest.main()
