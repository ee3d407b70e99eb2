# scripts/lib/steer-rx.sh — sourced by scripts/bench and scripts/profile: steer loopback
# receive processing to the load generator's core for the length of a measurement.
#
# On loopback a `send` runs the receiving socket's whole TCP receive path, and the wake-up of
# the process reading it, inside the sender's system call: without steering, every client's
# kernel work is billed to the server under test, which a client on another machine never
# costs it. Receive Packet Steering on `lo` queues each received packet to the listed cores
# instead, and a deeper backlog keeps that queue from dropping packets (a drop would show up as
# a 200 ms retransmission in the latency figures). Both settings are saved and put back by
# steer_rx_off, which callers run from their exit trap.

rps_file=/sys/class/net/lo/queues/rx-0/rps_cpus
backlog_file=/proc/sys/net/core/netdev_max_backlog
steer_backlog=50000
saved_rps="" saved_backlog=""

cpu_mask() { # cpu_mask LIST — hex mask of a taskset-style list such as 1 or 1,3 or 2-3
    local mask=0 part lo hi c parts
    IFS=, read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        lo=${part%-*} hi=${part#*-}
        for ((c = lo; c <= hi; c++)); do mask=$((mask | (1 << c))); done
    done
    printf '%x' "$mask"
}

steer_rx_on() { # steer_rx_on CPU_LIST
    if [[ ! -w $rps_file || ! -w $backlog_file ]]; then
        echo "steering loopback receive needs root (or pass --no-steer-rx)" >&2
        return 1
    fi
    saved_rps=$(cat "$rps_file") saved_backlog=$(cat "$backlog_file")
    cpu_mask "$1" >"$rps_file"
    echo "$steer_backlog" >"$backlog_file"
}

steer_rx_off() {
    if [[ -n $saved_rps ]]; then echo "$saved_rps" >"$rps_file"; fi
    if [[ -n $saved_backlog ]]; then echo "$saved_backlog" >"$backlog_file"; fi
    saved_rps="" saved_backlog=""
}

rx_drops() { # packets the kernel dropped from full receive queues, all cores
    local total=0 line
    while read -r -a line; do total=$((total + 16#${line[1]})); done </proc/net/softnet_stat
    echo "$total"
}
