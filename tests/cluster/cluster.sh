#!/usr/bin/env bash
# A real 3-node RabbitMQ cluster on this machine, on its own ports, for bench/cluster.py and by-hand tests.
#
#   tests/cluster/cluster.sh start          start c1, c2, c3 (AMQP 5681-5683) and join them into one cluster
#   tests/cluster/cluster.sh stop           stop every node and delete its data
#   tests/cluster/cluster.sh stop-node N    stop node cN only (its data kept: start-node N brings it back)
#   tests/cluster/cluster.sh start-node N   start node cN again (it rejoins the cluster by itself)
#   tests/cluster/cluster.sh status         cluster status as c1 (else c2) sees it
#   tests/cluster/cluster.sh urls           the MIDDLEWARE_BROKER_URL listing the three nodes
#
# The machine's own broker (rabbit@localhost, 5672) is never touched: each node has its own name
# (cN@localhost), config file (its own listeners.tcp.local, which /etc/rabbitmq/rabbitmq.conf would
# otherwise impose), distribution port, data, log, pid and enabled-plugins file under $MW_CLUSTER_DIR
# (default /tmp/mw-cluster). Run as root: the nodes run as the rabbitmq user (they share its Erlang cookie).
# Each node takes about 100 MB of memory; starting the three takes about 20-40 s.
set -euo pipefail

BASE=${MW_CLUSTER_DIR:-/tmp/mw-cluster}
FIRST_PORT=${MW_CLUSTER_PORT:-5681}
SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
NODES=(1 2 3)

port() { echo $((FIRST_PORT + $1 - 1)); }
ctl() { rabbitmqctl -q -n "c$1@localhost" "${@:2}"; }

start_node() {
  local n=$1 dir=$BASE/c$1
  mkdir -p "$dir/mnesia" "$dir/log"
  printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users.guest = true\n' "$(port "$n")" > "$dir/rabbitmq.conf"
  echo '[rabbitmq_consistent_hash_exchange].' > "$dir/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$BASE"
  runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq \
    RABBITMQ_NODENAME="c$n@localhost" RABBITMQ_NODE_PORT="$(port "$n")" RABBITMQ_DIST_PORT=$((25680 + n)) \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    "$SERVER" -detached
}

wait_node() {
  local n=$1
  for _ in $(seq 1 120); do
    if ctl "$n" await_startup --timeout 5 >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "node c$n@localhost did not start; see $BASE/c$n/log" >&2
  return 1
}

case "${1:-}" in
  start)
    for n in "${NODES[@]}"; do start_node "$n"; done
    for n in "${NODES[@]}"; do wait_node "$n"; done
    for n in 2 3; do
      ctl "$n" stop_app
      ctl "$n" join_cluster c1@localhost
      ctl "$n" start_app
    done
    ctl 1 cluster_status | grep -A4 -i "running nodes" || true
    echo "cluster up: $("$0" urls)"
    ;;
  stop)
    for n in "${NODES[@]}"; do timeout 30 rabbitmqctl -q -n "c$n@localhost" stop >/dev/null 2>&1 || true; done
    for n in "${NODES[@]}"; do  # a node whose rabbitmqctl did not answer: its own pid file, nothing else
      pid_file=$BASE/c$n/pid
      if [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        kill "$(cat "$pid_file")" || true
        sleep 10
        kill -0 "$(cat "$pid_file")" 2>/dev/null && kill -9 "$(cat "$pid_file")" || true
      fi
    done
    rm -rf "$BASE"
    echo "cluster stopped"
    ;;
  stop-node) timeout 60 rabbitmqctl -q -n "c${2:?node number}@localhost" stop ;;
  start-node) start_node "${2:?node number}"; wait_node "$2" ;;
  status) ctl 1 cluster_status 2>/dev/null || ctl 2 cluster_status ;;
  urls)
    urls=()
    for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$(port "$n")/"); done
    (IFS=,; echo "${urls[*]}")
    ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
