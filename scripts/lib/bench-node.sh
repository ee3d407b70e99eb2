# scripts/lib/bench-node.sh — sourced by scripts/bench and scripts/profile: the one environment
# every measurement runs our node with, so a profile measures the configuration the
# benchmark tables report (docs/benchmarks.md, "The servers and their configurations").

bench_node_env() { # bench_node_env NODE_ID PORT REDIS_PORT JWT_SECRET — one VAR=value per line
    printf '%s\n' "SSE_LISTEN=127.0.0.1:$2" "SSE_NODE_ID=$1" "SSE_REDIS_URL=redis://127.0.0.1:$3" \
        "SSE_JWT_SECRET=$4" SSE_MAX_CONNECTIONS_PER_USER=100000 SSE_IP_OPEN_RATE=0 SSE_IP_MAX_STREAMS=0 \
        SSE_LOG_LEVEL=warn
}
