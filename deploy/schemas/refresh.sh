#!/usr/bin/env bash
# Refreshes the vendored schemas from their registry packages (README.md beside this
# file): the Kubernetes standalone-strict schemas from PyPI kubernetes-validate, the
# Compose specification's schema from npm dclint. Needs pip and npm; CI never runs it.
#   deploy/schemas/refresh.sh [KUBERNETES_VALIDATE_VERSION] [DCLINT_VERSION] [K8S_VERSION]
set -euo pipefail
cd "$(dirname "$0")"
kv=${1:-1.37.0}
dclint=${2:-3.1.0}
k8s=${3:-v1.37.0}
# The kinds the manifests use; add one here when deploy/k8s gains a kind.
kinds=(_definitions namespace-v1 configmap-v1 secret-v1 service-v1 deployment-apps-v1
       statefulset-apps-v1 horizontalpodautoscaler-autoscaling-v2 poddisruptionbudget-policy-v1)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download --quiet --no-deps -d "$tmp" "kubernetes-validate==$kv"
(cd "$tmp" && python3 -m zipfile -e kubernetes_validate-"$kv"-*.whl kv)
src="$tmp/kv/kubernetes_validate/kubernetes-json-schema/$k8s-local-strict"
dst="kubernetes/$k8s-local-strict"
rm -rf kubernetes && mkdir -p "$dst"
for k in "${kinds[@]}"; do cp "$src/$k.json" "$dst/"; done

(cd "$tmp" && npm pack --silent "dclint@$dclint" >/dev/null && mkdir dc && tar xzf dclint-"$dclint".tgz -C dc)
mkdir -p compose
cp "$tmp/dc/package/schemas/compose.schema.json" compose/compose-spec.json
echo "refreshed: kubernetes-validate $kv ($k8s), dclint $dclint; update README.md and K8S_SCHEMA_DIR in deploy/check/src/lib.rs if the Kubernetes version changed"
