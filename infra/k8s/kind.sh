#!/usr/bin/env bash
# Keel on a local kind cluster (`make kind-up`, `make kind-down`; docs/deploy/kind.md).
#
#   infra/k8s/kind.sh up     create the cluster of k8s/kind-cluster.yaml (if it is not there),
#                            build the services' images and load them into its nodes, install
#                            metrics-server and KEDA, apply k8s/overlays/kind, and return once
#                            the migrations have completed and every Deployment has rolled out
#   infra/k8s/kind.sh down   delete the cluster and everything in it
#
# Needs docker, kind v0.32 or later (the node image k8s/kind-cluster.yaml pins is v0.32's),
# kubectl, and a network that reaches the container registries: the nodes pull Postgres,
# pgbouncer, RabbitMQ, Redis, metrics-server and KEDA. Keel's build machines have none of that,
# so this script is checked there (shellcheck, and the manifests by infra/k8s/check.sh) but
# not run.
#
# Every kubectl call names the cluster's context, so nothing here touches another cluster
# whatever the current context is. Environment (defaults in brackets):
#   KEEL_KIND_CLUSTER       the cluster's name [keel]
#   KEDA_VERSION            KEDA release to install [2.20.2]
#   METRICS_SERVER_VERSION  metrics-server release to install [0.9.0]
#   ROLLOUT_TIMEOUT         how long to wait for migrations and each rollout [300s]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

CLUSTER=${KEEL_KIND_CLUSTER:-keel}
CONTEXT=kind-$CLUSTER
NAMESPACE=keel
# KEDA 2.20 is tested on Kubernetes 1.33 to 1.35; kind-cluster.yaml pins 1.36, one minor past.
KEDA_VERSION=${KEDA_VERSION:-2.20.2}
METRICS_SERVER_VERSION=${METRICS_SERVER_VERSION:-0.9.0}
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-300s}
# The tag the kind overlay's `images:` gives every service.
TAG=dev

log() { printf 'kind: %s\n' "$*"; }
die() {
  printf 'kind: ERROR: %s\n' "$*" >&2
  exit 1
}
k() { kubectl --context "$CONTEXT" "$@"; }

require_tools() {
  local tool
  for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || die "$tool is not installed (docs/deploy/kind.md lists what is needed)"
  done
  local major minor
  read -r major minor < <(kind version | sed -E 's/^kind v?([0-9]+)\.([0-9]+).*/\1 \2/')
  if [[ ! $major =~ ^[0-9]+$ || ! $minor =~ ^[0-9]+$ ]]; then
    die "cannot read kind's version from '$(kind version)'"
  fi
  if ((major == 0 && minor < 32)); then
    die "kind v0.32 or later is needed for the node image in k8s/kind-cluster.yaml (found $(kind version))"
  fi
}

# The registry's services (infra/services.toml), each an image of the root Dockerfile.
services() { bash infra/dev/registry.sh services; }

build_images() {
  local svc
  while read -r svc; do
    log "building keel/$svc:$TAG"
    DOCKER_BUILDKIT=1 docker build --build-arg "SERVICE=$svc" --tag "keel/$svc:$TAG" .
  done < <(services)
}

# Whether the cluster exists. (Read whole, then matched: `kind get clusters | grep -q` could
# fail under pipefail when grep stops reading early.)
cluster_exists() {
  local clusters
  clusters=$(kind get clusters 2>/dev/null)
  grep -qx "$CLUSTER" <<<"$clusters"
}

create_cluster() {
  if cluster_exists; then
    log "cluster $CLUSTER exists; reusing it"
  else
    log "creating cluster $CLUSTER (k8s/kind-cluster.yaml)"
    kind create cluster --name "$CLUSTER" --config k8s/kind-cluster.yaml --wait 180s
  fi
}

load_images() {
  local -a images=()
  local svc
  while read -r svc; do images+=("keel/$svc:$TAG"); done < <(services)
  # No registry: the images go straight into every node's container runtime, which is why the
  # manifests say imagePullPolicy: IfNotPresent.
  log "loading ${images[*]} into the nodes"
  kind load docker-image --name "$CLUSTER" "${images[@]}"
}

# What the base expects of any cluster: the resource metrics API (checkout's HPA) and KEDA
# (notification's ScaledObject). Managed clusters usually have the first; the second is an
# install of its own in production too (docs/deploy/production.md).
install_addons() {
  log "installing metrics-server v$METRICS_SERVER_VERSION"
  k apply -f "https://github.com/kubernetes-sigs/metrics-server/releases/download/v$METRICS_SERVER_VERSION/components.yaml"
  # kind's kubelets serve certificates the cluster CA did not sign; metrics-server must not
  # insist on verifying them. For kind only: never on a real cluster.
  local args
  args=$(k -n kube-system get deployment metrics-server -o jsonpath='{.spec.template.spec.containers[0].args}')
  if [[ $args != *--kubelet-insecure-tls* ]]; then
    k -n kube-system patch deployment metrics-server --type=json \
      -p '[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--kubelet-insecure-tls"}]'
  fi

  log "installing KEDA v$KEDA_VERSION"
  # Server-side: KEDA's CRDs are too large for the annotation client-side apply keeps.
  k apply --server-side --force-conflicts \
    -f "https://github.com/kedacore/keda/releases/download/v$KEDA_VERSION/keda-$KEDA_VERSION.yaml"
  k wait --for=condition=established --timeout=60s \
    crd/scaledobjects.keda.sh crd/triggerauthentications.keda.sh
  # KEDA's admission webhook checks every ScaledObject: it must answer before ours is applied.
  local deployment
  for deployment in keda-operator keda-operator-metrics-apiserver keda-admission-webhooks; do
    k -n keda rollout status "deployment/$deployment" --timeout="$ROLLOUT_TIMEOUT"
  done
  k -n kube-system rollout status deployment/metrics-server --timeout="$ROLLOUT_TIMEOUT"
}

deploy() {
  # A Job's pod template cannot change, so an apply that changes one fails: the finished
  # migration Jobs go first and the apply creates them afresh (their run is a no-op when
  # nothing is new). The Deployments' `migrate` init containers keep the order meanwhile.
  k -n "$NAMESPACE" delete job -l app.kubernetes.io/component=migration --ignore-not-found --wait
  log "applying k8s/overlays/kind"
  k apply -k k8s/overlays/kind
}

diagnose() {
  k -n "$NAMESPACE" get pods -o wide || true
  k -n "$NAMESPACE" get events --sort-by=.lastTimestamp | tail -n 30 || true
}

wait_ready() {
  log "waiting for the migrations (up to $ROLLOUT_TIMEOUT)"
  if ! k -n "$NAMESPACE" wait --for=condition=complete --timeout="$ROLLOUT_TIMEOUT" \
    job -l app.kubernetes.io/component=migration; then
    diagnose
    die "a migration Job did not complete: kubectl --context $CONTEXT -n $NAMESPACE logs job/<service>-migrate"
  fi
  local deployment
  while read -r deployment; do
    if ! k -n "$NAMESPACE" rollout status "$deployment" --timeout="$ROLLOUT_TIMEOUT"; then
      diagnose
      die "$deployment did not become ready"
    fi
  done < <(k -n "$NAMESPACE" get deployments -o name)
}

up() {
  require_tools
  build_images
  create_cluster
  load_images
  install_addons
  deploy
  wait_ready
  # One bounded look through the same path a reader's curl takes (host 8080 -> NodePort).
  if curl -fsS --max-time 5 http://127.0.0.1:8080/readyz; then
    printf '\n'
  else
    log "checkout did not answer on 127.0.0.1:8080 (is another process using the port?)"
  fi
  log "ready: checkout on http://127.0.0.1:8080; kubectl --context $CONTEXT -n $NAMESPACE get pods"
}

down() {
  command -v kind >/dev/null || die "kind is not installed"
  if cluster_exists; then
    kind delete cluster --name "$CLUSTER"
  else
    log "no cluster $CLUSTER; nothing to delete"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *)
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 64
    ;;
esac
