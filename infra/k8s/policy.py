#!/usr/bin/env python3
"""Keel's policy for its rendered Kubernetes manifests: the proof behind P40, P41 and P46 (and
the Kubernetes half of P20 and P21) where nothing can run a cluster.

    policy.py RENDERED.yaml [...]   # e.g. the output of `kubectl kustomize k8s/overlays/kind`

Prints one line per violation, `<rule>: <Kind>/<name>[ container <c>]: <what is wrong>`, and
exits 1 if there is any, 0 if there is none, 2 if the input cannot be read. infra/k8s/check.sh
runs it on every overlay; infra/k8s/test_policy.py proves each rule fails on a manifest
that breaks it. Standard library and PyYAML only.

The rules, by id (RULES below says the same in one line each):

- Pods (every container, init containers included): requests and limits for CPU and memory;
  run as a non-root, numeric user; read-only root filesystem; no privilege escalation; every
  capability dropped and none added; the runtime's seccomp profile; no host namespaces, host
  ports, privileged mode or host paths, and only the volume types the `restricted` Pod
  Security profile allows; no service account token.
- Long-running containers (Deployment, StatefulSet, DaemonSet) have startup, liveness and
  readiness probes, and liveness never asks /readyz (P21: a liveness probe that checks
  dependencies restarts every pod when a dependency blips).
- A service's Deployment rolls with maxUnavailable 0 / maxSurge 1, gives its pods at least the
  sum of the service's shutdown stages to stop (services/<name>/config/default.toml, with any
  KEEL_SHUTDOWN__* override), and, when an autoscaler owns its replica count, sets none itself.
- Every workload that can run more than one replica has a PodDisruptionBudget that still
  lets a drain evict one pod (P40).
- Every namespace is declared here and enforces the `restricted` profile (P46).
- Every pod is under a default deny, every port a NetworkPolicy opens is a path of JOURNEY,
  and every path of JOURNEY whose ends are in the manifests is open at both ends (P46).
- Every autoscaler targets a Deployment that exists; a KEDA TriggerAuthentication and every
  `KEEL_*_FILE` variable name a Secret key that exists (when the manifests carry Secrets).
- Every image is pinned by a tag other than `latest`, or by a digest.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO = Path(__file__).resolve().parents[2]

RULES = {
    "probes": "long-running containers have startup, liveness and readiness probes",
    "liveness-not-readyz": "a liveness probe never asks /readyz",
    "resources": "every container requests and limits CPU and memory",
    "run-as-non-root": "every container runs with runAsNonRoot: true",
    "run-as-user": "every container runs as a numeric user other than 0",
    "read-only-root-fs": "every container has readOnlyRootFilesystem: true",
    "no-privilege-escalation": "every container has allowPrivilegeEscalation: false",
    "drop-all-capabilities": "every container drops ALL capabilities and adds none",
    "seccomp": "every pod uses the RuntimeDefault (or a Localhost) seccomp profile",
    "pss-restricted": "no host namespaces, host ports, privileged mode or disallowed volumes",
    "no-sa-token": "no pod mounts a service account token",
    "image-pinned": "every image has a tag other than latest, or a digest",
    "rolling-update": "a service's Deployment rolls with maxUnavailable 0 and maxSurge 1",
    "grace-period": "terminationGracePeriodSeconds covers the service's shutdown stages",
    "replicas-owned-by-autoscaler": "a Deployment an autoscaler scales sets no replicas",
    "autoscaler-target": "every autoscaler targets a Deployment in the manifests",
    "pdb": "every workload that can run more than one replica has a PodDisruptionBudget",
    "pdb-allows-eviction": "a PodDisruptionBudget lets a drain evict at least one pod",
    "namespace-restricted": "every namespace is declared and enforces the restricted profile",
    "default-deny": "every pod is under a deny-all NetworkPolicy (ingress and egress)",
    "netpol-journey": "every port a NetworkPolicy opens is a path of JOURNEY",
    "journey-blocked": "every path of JOURNEY between workloads present is open at both ends",
    "secret-reference": "every Secret key a workload or TriggerAuthentication names exists",
}

# The journey's network paths, (from, to, port): everything the manifests may open, and
# everything they must. Names are workloads' `app.kubernetes.io/name`; "anywhere" is any
# source (the public API), "<namespace>/<app>" a pod outside Keel's namespace, "*" every
# workload. A new path is a change here first, with its reason. The paths every service with
# a database or a broker has follow from its registry entry (infra/services.toml), so a
# service added by `make new-service` gets them without an edit here.
REGISTRY = tomllib.loads((REPO / "infra" / "services.toml").read_text(encoding="utf-8"))["service"]
DATABASE_SERVICES = tuple(s["name"] for s in REGISTRY if s.get("database"))
BROKER_SERVICES = tuple(s["name"] for s in REGISTRY if s.get("broker"))
JOURNEY: dict[tuple[str, str, int], str] = {
    ("anywhere", "checkout", 8080): "the public orders API",
    ("checkout", "billing", 50051): "the saga's payment calls (gRPC)",
    ("billing", "psp-sim", 8090): "billing calls the payment provider",
    ("psp-sim", "billing", 8081): "the provider's signed capture webhook",
    ("pgbouncer", "postgres", 5432): "pgbouncer's server connections",
    ("keda/keda-operator", "rabbitmq", 5672): "KEDA reads notification.events' depth",
    # Only where the manifests run a Mailpit (the kind overlay); elsewhere mail leaves for a
    # relay the deployment names.
    ("notification", "mailpit", 1025): "notification's email (SMTP)",
    ("*", "kube-system/kube-dns", 53): "name resolution",
}
for _svc in DATABASE_SERVICES:
    JOURNEY[(_svc, "pgbouncer", 6432)] = "the runtime pool, through pgbouncer"
    JOURNEY[(_svc, "postgres", 5432)] = "the `migrate` init container, as the owner role"
    JOURNEY[(f"{_svc}-migrate", "postgres", 5432)] = "the migration Job, as the owner role"
for _svc in BROKER_SERVICES:
    JOURNEY[(_svc, "rabbitmq", 5672)] = "the outbox relay (and notification's consumer)"

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
# The volume types the `restricted` Pod Security profile allows.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
NAME_LABEL = "app.kubernetes.io/name"


@dataclass(frozen=True)
class Violation:
    rule: str
    obj: str  # "Kind/name"
    detail: str
    container: str | None = None

    def __str__(self) -> str:
        where = f"{self.obj} container {self.container}" if self.container else self.obj
        return f"{self.rule}: {where}: {self.detail}"


@dataclass
class Workload:
    """A pod template and what it came from."""

    kind: str
    name: str  # the object's name
    app: str  # the pods' app.kubernetes.io/name, what JOURNEY calls it
    namespace: str
    labels: dict[str, str]
    spec: dict[str, Any]  # the pod spec
    obj: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every object of the given multi-document YAML files, empty documents left out."""
    docs: list[dict[str, Any]] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d)
    return docs


def ref(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def workloads(docs: list[dict[str, Any]]) -> list[Workload]:
    out = []
    for obj in docs:
        if obj.get("kind") not in WORKLOAD_KINDS:
            continue
        template = obj.get("spec", {}).get("template", {})
        labels = template.get("metadata", {}).get("labels", {}) or {}
        meta = obj.get("metadata", {})
        out.append(Workload(
            kind=obj["kind"], name=meta.get("name", ""),
            app=labels.get(NAME_LABEL, meta.get("name", "")),
            namespace=meta.get("namespace", "default"), labels=labels,
            spec=template.get("spec", {}) or {}, obj=obj))
    return out


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector against a set of labels (an empty selector matches all)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def duration_seconds(text: str) -> float:
    """A Keel config duration ("2s", "500ms", "1m30s") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s", "", text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


# -- pods -----------------------------------------------------------------------------------


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def check_pod(w: Workload, service_accounts: dict[str, dict[str, Any]]) -> list[Violation]:
    v: list[Violation] = []
    spec = w.spec
    pod_sc = spec.get("securityContext") or {}

    for flag in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        # hostUsers defaults to true (no user namespace), which `restricted` allows.
        if flag != "hostUsers" and spec.get(flag):
            v.append(Violation("pss-restricted", w.ref, f"{flag}: true"))
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        bad = kinds - RESTRICTED_VOLUMES
        if bad:
            v.append(Violation("pss-restricted", w.ref,
                               f"volume {vol.get('name')} is {', '.join(sorted(bad))}"))

    seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for c in all_containers(spec):
        c_seccomp = ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        if (c_seccomp or seccomp) not in ("RuntimeDefault", "Localhost"):
            v.append(Violation("seccomp", w.ref, "no RuntimeDefault seccomp profile",
                               c.get("name")))

    automount = spec.get("automountServiceAccountToken")
    if automount is None:
        sa = service_accounts.get(spec.get("serviceAccountName") or "default", {})
        automount = sa.get("automountServiceAccountToken", True)
    if automount is not False:
        v.append(Violation("no-sa-token", w.ref,
                           "automountServiceAccountToken is not false (pod or service account)"))

    for c in all_containers(spec):
        v.extend(check_container(w, c, pod_sc))
    return v


def check_container(w: Workload, c: dict[str, Any], pod_sc: dict[str, Any]) -> list[Violation]:
    v: list[Violation] = []
    name = c.get("name")
    sc = c.get("securityContext") or {}

    def effective(key: str) -> Any:
        return sc[key] if key in sc else pod_sc.get(key)

    resources = c.get("resources") or {}
    missing = [f"{kind}.{res}" for kind in ("requests", "limits") for res in ("cpu", "memory")
               if res not in (resources.get(kind) or {})]
    if missing:
        v.append(Violation("resources", w.ref, f"missing {', '.join(missing)}", name))
    if effective("runAsNonRoot") is not True:
        v.append(Violation("run-as-non-root", w.ref, "runAsNonRoot is not true", name))
    user = effective("runAsUser")
    if not isinstance(user, int) or user == 0:
        v.append(Violation("run-as-user", w.ref,
                           f"runAsUser is {user!r}: set the image's numeric, non-root user",
                           name))
    if sc.get("readOnlyRootFilesystem") is not True:
        v.append(Violation("read-only-root-fs", w.ref, "readOnlyRootFilesystem is not true",
                           name))
    if sc.get("allowPrivilegeEscalation") is not False:
        v.append(Violation("no-privilege-escalation", w.ref,
                           "allowPrivilegeEscalation is not false", name))
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        v.append(Violation("drop-all-capabilities", w.ref, "capabilities.drop lacks ALL", name))
    if caps.get("add"):
        v.append(Violation("drop-all-capabilities", w.ref,
                           f"adds capabilities {caps['add']}", name))
    if sc.get("privileged"):
        v.append(Violation("pss-restricted", w.ref, "privileged: true", name))
    for port in c.get("ports") or []:
        if port.get("hostPort"):
            v.append(Violation("pss-restricted", w.ref, f"hostPort {port['hostPort']}", name))

    image = c.get("image", "")
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
        v.append(Violation("image-pinned", w.ref, f"image {image!r} has no pinned tag", name))

    if w.kind in LONG_RUNNING_KINDS and c in (w.spec.get("containers") or []):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if not c.get(probe):
                v.append(Violation("probes", w.ref, f"no {probe}", name))
        path = ((c.get("livenessProbe") or {}).get("httpGet") or {}).get("path", "")
        if path.rstrip("/").startswith("/readyz"):
            v.append(Violation("liveness-not-readyz", w.ref,
                               f"livenessProbe asks {path}: liveness must not check "
                               "dependencies (use /livez)", name))
    return v


# -- services' Deployments ------------------------------------------------------------------


def shutdown_budget(service: str, env: dict[str, str], root: Path) -> float | None:
    """The sum of a service's shutdown stages, with the container's overrides, or None."""
    path = root / "services" / service / "config" / "default.toml"
    if not path.is_file():
        return None
    stages = tomllib.loads(path.read_text(encoding="utf-8")).get("shutdown", {})
    total = 0.0
    for key, value in stages.items():
        total += duration_seconds(env.get(f"KEEL_SHUTDOWN__{key.upper()}", value))
    return total


def check_service_deployment(w: Workload, autoscaled: set[str], root: Path) -> list[Violation]:
    v: list[Violation] = []
    spec = w.obj.get("spec", {})
    rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    # One exception, stated where it is made: a single replica whose state lives in its memory
    # (psp-sim) must not overlap with its successor, which would split that state; it is
    # recreated, and says why in the annotation.
    recreate_why = ((w.obj.get("metadata") or {}).get("annotations") or {}).get(
        "keel.dev/recreate-because", "")
    recreated = ((spec.get("strategy") or {}).get("type") == "Recreate"
                 and spec.get("replicas") == 1 and recreate_why.strip())
    if not recreated and ((spec.get("strategy") or {}).get("type", "RollingUpdate") != "RollingUpdate"
            or rolling.get("maxUnavailable") != 0 or rolling.get("maxSurge") != 1):
        v.append(Violation("rolling-update", w.ref,
                           f"strategy is {spec.get('strategy')!r}, not RollingUpdate with "
                           "maxUnavailable 0 and maxSurge 1"))
    if w.name in autoscaled and "replicas" in spec:
        v.append(Violation("replicas-owned-by-autoscaler", w.ref,
                           f"sets replicas: {spec['replicas']}, which every apply writes "
                           "over the autoscaler's choice"))
    main = (w.spec.get("containers") or [{}])[0]
    env = {e["name"]: e.get("value", "") for e in main.get("env") or [] if "name" in e}
    budget = shutdown_budget(w.app, env, root)
    grace = w.spec.get("terminationGracePeriodSeconds", 30)
    if budget is None:
        v.append(Violation("grace-period", w.ref,
                           f"no services/{w.app}/config/default.toml to check against"))
    elif grace < budget:
        v.append(Violation("grace-period", w.ref,
                           f"terminationGracePeriodSeconds {grace} < {budget:g} s, the sum of "
                           f"{w.app}'s shutdown stages: the kubelet would kill it mid-stop"))
    return v


# -- replicas, autoscalers and disruption budgets ---------------------------------------------


def autoscalers(docs: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(autoscaler ref, target Deployment name, max replicas) of every HPA and ScaledObject."""
    out = []
    for obj in docs:
        spec = obj.get("spec", {})
        if obj.get("kind") == "HorizontalPodAutoscaler":
            out.append((ref(obj), spec.get("scaleTargetRef", {}).get("name", ""),
                        int(spec.get("maxReplicas", 1))))
        elif obj.get("kind") == "ScaledObject":
            # KEDA's default maximum is 100.
            out.append((ref(obj), spec.get("scaleTargetRef", {}).get("name", ""),
                        int(spec.get("maxReplicaCount", 100))))
    return out


def check_disruption(docs: list[dict[str, Any]], ws: list[Workload]) -> list[Violation]:
    v: list[Violation] = []
    scalers = autoscalers(docs)
    deployments = {w.name for w in ws if w.kind == "Deployment"}
    for scaler, target, _ in scalers:
        if target not in deployments:
            v.append(Violation("autoscaler-target", scaler,
                               f"targets Deployment/{target}, which is not in the manifests"))
    pdbs = [o for o in docs if o.get("kind") == "PodDisruptionBudget"]
    for pdb in pdbs:
        spec = pdb.get("spec", {})
        if str(spec.get("maxUnavailable")) in ("0", "0%") or str(spec.get("minAvailable")) == "100%":
            v.append(Violation("pdb-allows-eviction", ref(pdb),
                               "allows no eviction: every node drain would block on it"))
    for w in ws:
        if w.kind not in ("Deployment", "StatefulSet"):
            continue
        most = max([int(w.obj.get("spec", {}).get("replicas", 1))]
                   + [m for _, target, m in scalers if target == w.name])
        if most <= 1:
            continue
        if not any(p.get("metadata", {}).get("namespace") == w.namespace
                   and selector_matches(p.get("spec", {}).get("selector"), w.labels)
                   for p in pdbs):
            v.append(Violation("pdb", w.ref,
                               f"can run {most} replicas and no PodDisruptionBudget selects "
                               "its pods: a node drain may evict them all at once"))
    return v


# -- namespaces -----------------------------------------------------------------------------


def check_namespaces(docs: list[dict[str, Any]]) -> list[Violation]:
    v: list[Violation] = []
    declared = {o["metadata"]["name"]: o for o in docs if o.get("kind") == "Namespace"}
    for name, ns in declared.items():
        labels = ns.get("metadata", {}).get("labels") or {}
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            v.append(Violation("namespace-restricted", f"Namespace/{name}",
                               "pod-security.kubernetes.io/enforce is "
                               f"{labels.get('pod-security.kubernetes.io/enforce')!r}, "
                               "not restricted"))
    used = {o.get("metadata", {}).get("namespace") for o in docs if o.get("kind") != "Namespace"}
    for name in sorted(n or "default" for n in used):
        if name not in declared:
            v.append(Violation("namespace-restricted", f"Namespace/{name}",
                               "holds objects but is not declared, so nothing here makes it "
                               "enforce the restricted profile"))
    return v


# -- network policies -----------------------------------------------------------------------


def peer_names(peer: dict[str, Any], ws: list[Workload], namespace: str) -> list[str]:
    """What one NetworkPolicy peer admits, as JOURNEY names."""
    if "ipBlock" in peer:
        return [f"ipBlock {peer['ipBlock'].get('cidr')}"]
    pod_selector = peer.get("podSelector")
    if "namespaceSelector" in peer:
        ns_labels = (peer["namespaceSelector"] or {}).get("matchLabels") or {}
        ns = ns_labels.get("kubernetes.io/metadata.name")
        pod_labels = (pod_selector or {}).get("matchLabels") or {}
        app = (pod_labels.get("k8s-app") or pod_labels.get("app")
               or pod_labels.get(NAME_LABEL))
        if ns is None or (ns == namespace and not app):
            return ["any namespace" if ns is None else f"{ns}/*"]
        if ns != namespace:
            return [f"{ns}/{app or '*'}"]
    matched = [w.app for w in ws if w.namespace == namespace
               and selector_matches(pod_selector, w.labels)]
    return matched or [f"pods matching {pod_selector} (none in the manifests)"]


def rule_ports(rule: dict[str, Any], target: Workload | None) -> list[int | str]:
    """The ports a rule opens; "all" when it names none."""
    ports = rule.get("ports")
    if not ports:
        return ["all"]
    out: list[int | str] = []
    for p in ports:
        port = p.get("port")
        if isinstance(port, str) and target is not None:
            named = [cp["containerPort"] for c in target.spec.get("containers") or []
                     for cp in c.get("ports") or [] if cp.get("name") == port]
            port = named[0] if named else port
        out.append(port if port is not None else "all")
    return out


def policies(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in docs if o.get("kind") == "NetworkPolicy"]


def selected(policy: dict[str, Any], ws: list[Workload]) -> list[Workload]:
    ns = policy.get("metadata", {}).get("namespace", "default")
    return [w for w in ws if w.namespace == ns
            and selector_matches(policy.get("spec", {}).get("podSelector"), w.labels)]


def types(policy: dict[str, Any]) -> list[str]:
    spec = policy.get("spec", {})
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def in_journey(src: str, dst: str, port: int | str) -> bool:
    return (src, dst, port) in JOURNEY or ("*", dst, port) in JOURNEY


def check_network(docs: list[dict[str, Any]], ws: list[Workload]) -> list[Violation]:
    v: list[Violation] = []
    nps = policies(docs)

    for w in ws:
        if not any(w in selected(p, ws) and set(types(p)) >= {"Ingress", "Egress"}
                   and not p["spec"].get("ingress") and not p["spec"].get("egress")
                   for p in nps):
            v.append(Violation("default-deny", w.ref,
                               "no deny-all NetworkPolicy (ingress and egress) selects its pods"))

    for p in nps:
        ns = p.get("metadata", {}).get("namespace", "default")
        for w in selected(p, ws):
            for direction, key in (("Ingress", "from"), ("Egress", "to")):
                if direction not in types(p):
                    continue
                for rule in p["spec"].get(direction.lower()) or []:
                    peers = rule.get(key) or []
                    names = ([n for peer in peers for n in peer_names(peer, ws, ns)]
                             if peers else ["anywhere"])
                    for name in names:
                        dst_w = w if direction == "Ingress" else next(
                            (x for x in ws if x.app == name), None)
                        for port in rule_ports(rule, dst_w):
                            src, dst = (name, w.app) if direction == "Ingress" else (w.app, name)
                            if port == "all" or not in_journey(src, dst, port):
                                v.append(Violation(
                                    "netpol-journey", ref(p),
                                    f"{direction.lower()} rule opens {src} -> {dst}:{port}, "
                                    "which is no journey path"))
    v.extend(check_journey_open(nps, ws))
    return v


def allows(nps: list[dict[str, Any]], ws: list[Workload], direction: str, pod: Workload,
           other: str, port: int) -> bool:
    """Whether `pod` may receive from (Ingress) or send to (Egress) `other` on `port`."""
    key = "from" if direction == "Ingress" else "to"
    relevant = [p for p in nps if pod in selected(p, ws) and direction in types(p)]
    if not relevant:
        return True  # not isolated in this direction
    for p in relevant:
        ns = p.get("metadata", {}).get("namespace", "default")
        for rule in p["spec"].get(direction.lower()) or []:
            peers = rule.get(key) or []
            names = ([n for peer in peers for n in peer_names(peer, ws, ns)]
                     if peers else ["anywhere", other])
            target = pod if direction == "Ingress" else next(
                (x for x in ws if x.app == other), None)
            ports = rule_ports(rule, target)
            if other in names and ("all" in ports or port in ports):
                return True
    return False


def check_journey_open(nps: list[dict[str, Any]], ws: list[Workload]) -> list[Violation]:
    v: list[Violation] = []
    apps = {w.app: w for w in ws}
    for (src, dst, port), why in JOURNEY.items():
        sources = list(apps) if src == "*" else [src]
        for s in sources:
            external_src = s not in apps
            external_dst = dst not in apps
            # A path between two workloads needs both in the manifests; a path from or to
            # outside is checked at the end that is here.
            if (external_src and "/" not in s and s != "anywhere") or (
                    external_dst and "/" not in dst):
                continue
            if not external_src and not allows(nps, ws, "Egress", apps[s], dst, port):
                v.append(Violation("journey-blocked", apps[s].ref,
                                   f"no egress to {dst}:{port} ({why})"))
            if not external_dst and not allows(nps, ws, "Ingress", apps[dst], s, port):
                v.append(Violation("journey-blocked", apps[dst].ref,
                                   f"no ingress from {s} on {port} ({why})"))
    return v


# -- references -----------------------------------------------------------------------------


def check_references(docs: list[dict[str, Any]], ws: list[Workload]) -> list[Violation]:
    """Secret keys named by mounted-file variables and by KEDA exist. Only where the manifests
    carry Secrets at all: the base leaves them to an overlay."""
    secrets = {o["metadata"]["name"]: set((o.get("data") or {}) | (o.get("stringData") or {}))
               for o in docs if o.get("kind") == "Secret"}
    if not secrets:
        return []
    v: list[Violation] = []
    for w in ws:
        mounts_by_volume = {vol["name"]: vol["secret"].get("secretName")
                            for vol in w.spec.get("volumes") or [] if "secret" in vol}
        for c in all_containers(w.spec):
            paths = {m["mountPath"].rstrip("/"): mounts_by_volume[m["name"]]
                     for m in c.get("volumeMounts") or [] if m.get("name") in mounts_by_volume}
            for e in c.get("env") or []:
                if not e.get("name", "").endswith("_FILE") or "value" not in e:
                    continue
                directory, _, key = e["value"].rpartition("/")
                secret = paths.get(directory)
                if secret is None:
                    v.append(Violation("secret-reference", w.ref,
                                       f"{e['name']}={e['value']} is under no mounted Secret",
                                       c.get("name")))
                elif key not in secrets.get(secret, set()):
                    v.append(Violation("secret-reference", w.ref,
                                       f"{e['name']}: Secret {secret} has no key {key!r}",
                                       c.get("name")))
    for obj in docs:
        if obj.get("kind") != "TriggerAuthentication":
            continue
        for target in obj.get("spec", {}).get("secretTargetRef") or []:
            if target.get("key") not in secrets.get(target.get("name"), set()):
                v.append(Violation("secret-reference", ref(obj),
                                   f"Secret {target.get('name')} has no key "
                                   f"{target.get('key')!r}"))
    return v


# -- everything -----------------------------------------------------------------------------


def check(docs: list[dict[str, Any]], root: Path = REPO) -> list[Violation]:
    """Every violation of every rule in `docs` (the objects of one rendered overlay)."""
    ws = workloads(docs)
    service_accounts = {o["metadata"]["name"]: o for o in docs
                        if o.get("kind") == "ServiceAccount"}
    autoscaled = {target for _, target, _ in autoscalers(docs)}
    v: list[Violation] = []
    for w in ws:
        v.extend(check_pod(w, service_accounts))
        if w.kind == "Deployment" and w.labels.get("app.kubernetes.io/component") == "service":
            v.extend(check_service_deployment(w, autoscaled, root))
    v.extend(check_disruption(docs, ws))
    v.extend(check_namespaces(docs))
    v.extend(check_network(docs, ws))
    v.extend(check_references(docs, ws))
    return v


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print(f"usage: {Path(argv[0]).name} RENDERED.yaml [...]")
        return 2 if len(argv) < 2 else 0
    try:
        docs = load(argv[1:])
    except (OSError, yaml.YAMLError) as e:
        print(f"policy: cannot read the manifests: {e}", file=sys.stderr)
        return 2
    violations = check(docs)
    for violation in violations:
        print(violation)
    names = ", ".join(argv[1:])
    if violations:
        print(f"policy: {len(violations)} violation(s) in {names}")
        return 1
    print(f"policy: {len(docs)} objects in {names} meet all {len(RULES)} rules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
