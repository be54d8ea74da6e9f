# Shell helpers shared by scripts/*.sh. Source it; it defines functions only.

# Installs redis-server from Debian's packages when it is missing (needs root or sudo).
ensure_redis() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
  echo "==> installing redis-server (apt)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
  # the package starts a system service on 6379; agentq never uses it, so leave it as it is
}

ensure_cmd() { # ensure_cmd CMD DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "==> installing $2 (apt)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_http() { # wait_http URL [seconds]
  local url=$1 deadline=$(( $(date +%s) + ${2:-30} ))
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out waiting for $url" >&2; return 1; }
    sleep 0.1
  done
}

# stop_in_order PID... : SIGTERM each in turn, up to 10 s to exit, then SIGKILL. One at a time and
# in the order given (worker, api, then the LLM and Redis), so a draining worker still has Redis to
# record its last results and give back the rest.
stop_in_order() {
  local pid
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
