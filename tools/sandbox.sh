#!/usr/bin/env bash
# A local sandbox: a real kube-apiserver + etcd on 127.0.0.1, the MailIntegration CRD, and an example.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="$(tools/control-plane.sh | tail -n 1)"
dir="$(mktemp -d -t mio-sandbox-XXXX)"
pids=()
cleanup() {
  echo "sandbox: stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
"$bin/etcd" --name=sandbox --data-dir="$dir/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
  --initial-cluster="sandbox=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level=warn >"$dir/etcd.log" 2>&1 &
pids+=($!)
openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
token=$(openssl rand -hex 16)
echo "$token,admin,admin-uid,\"system:masters\"" > "$dir/tokens.csv"
"$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" --bind-address=127.0.0.1 \
  --secure-port="$api_port" --cert-dir="$dir/certs" --service-cluster-ip-range=10.0.0.0/24 \
  --authorization-mode=RBAC --allow-privileged=true --disable-admission-plugins=ServiceAccount \
  --service-account-issuer=https://127.0.0.1 --service-account-key-file="$dir/sa.key" \
  --service-account-signing-key-file="$dir/sa.key" --token-auth-file="$dir/tokens.csv" >"$dir/kube-apiserver.log" 2>&1 &
pids+=($!)
export KUBECONFIG="$dir/kubeconfig"
until [ -f "$dir/certs/apiserver.crt" ]; do sleep 0.5; done
"$bin/kubectl" config set-cluster sandbox --server="https://127.0.0.1:$api_port" --certificate-authority="$dir/certs/apiserver.crt" >/dev/null
"$bin/kubectl" config set-credentials admin --token="$token" >/dev/null
"$bin/kubectl" config set-context sandbox --cluster=sandbox --user=admin >/dev/null
"$bin/kubectl" config use-context sandbox >/dev/null
for _ in $(seq 1 120); do "$bin/kubectl" get --raw /readyz >/dev/null 2>&1 && break; sleep 0.5; done
echo "sandbox: kube-apiserver $("$bin/kubectl" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])') at https://127.0.0.1:$api_port"
"$bin/kubectl" apply --server-side -f crds/
"$bin/kubectl" wait --for=condition=Established crd/mailintegrations.mailintegration.dev --timeout=60s
"$bin/kubectl" apply -f deploy/examples/google.yaml
"$bin/kubectl" get mailint
echo
echo "sandbox: ready. In another shell:"
echo "  export KUBECONFIG=$KUBECONFIG PATH=$bin:\$PATH"
echo "  kubectl get mailint -o yaml"
echo "sandbox: press Ctrl-C to stop."
if [ "${MIO_SANDBOX_EXIT:-}" = 1 ]; then exit 0; fi
wait
