#!/usr/bin/env bash
# bench.sh - Sluice side by side with nginx, on one machine, over loopback.
#
# Run it from anywhere as `cargo xtask bench [SCENARIO]` (or `bash bench/bench.sh [SCENARIO]`).
# It takes a few minutes; NICE=-15 (as root) keeps a concurrent compile from stealing the cores.
#
# What it does, in order:
#   1. Installs what is missing, from Debian's packages: nginx and wrk
#      (`apt-get install -y nginx-light wrk`, falling back to `nginx`), plus curl, iproute2 (ss),
#      util-linux (taskset) and python3 when absent. It needs root (or password-less sudo) only
#      if something is missing. NB: on a host with systemd the nginx package also enables and
#      starts the system's own nginx on port 80; the bench neither uses nor stops it.
#   2. Builds Sluice in release mode and the plugins, from the workspace root:
#      `cargo build --release -p sluice` and `cargo xtask build-plugins` (SKIP_BUILD=1 skips it).
#   3. Writes every config into a fresh run folder, $PERF_DIR/run/<timestamp>-<pid>/, starts the
#      processes there, pinned with taskset, measures with wrk, writes results.md into the run
#      folder and prints it. Everything it started is stopped by PID on exit, error or Ctrl-C.
#
# Scenarios:
#   bench.sh [main]     side by side (default). Targets, interleaved over RUNS rounds, each
#                       round in a rotated order:
#                         upstream         the upstream itself, no proxy       127.0.0.1:9000
#                         nginx            nginx reverse proxy, keep-alive pool 127.0.0.1:9001
#                         sluice           Sluice, route without policies       127.0.0.1:9003
#                         sluice-policies  Sluice, route with transform + auth + throttle
#                       Sluice is started fresh for each of its measurements
#                       (`sluice run --config FILE --workers 1`, on the proxy core) and stopped
#                       after it. `bench.sh main sluice nginx` measures a subset (nginx is always
#                       measured: it is the reference of the ratios).
#   bench.sh loop       a policy in `loop {}` on /loop (tests/guests/chaos, mode "loop", stopped
#                       at its deadline) under LOOP_CONNS connections of background load, while
#                       /plain (no policies) on the same gateway is measured; against /plain
#                       measured without the background load in the same rounds.
#   bench.sh overload   a slow upstream (python3 asyncio, answers after SLOW_DELAY_MS, at most
#                       SLOW_LIMIT at once) behind a route with max_in_flight = SLOW_LIMIT and
#                       max_queued = OVERLOAD_QUEUED, offered OVERLOAD_FACTOR times its capacity
#                       for OVERLOAD_ROUNDS rounds of OVERLOAD_DURATION seconds by wrk with a Lua
#                       script that records every response's status and latency; reports the
#                       latency of the shed (503) answers next to the harness's floor (the same
#                       load on nginx answering at once), Sluice's RSS before and after, and
#                       whether normal requests succeed afterwards.
#   bench.sh profile    where Sluice spends its CPU under the main load (PROFILE_CONFIG=plain, or
#                       policies): perf samples (cpu-clock event) and a callgrind count of the
#                       instructions per request, when perf and valgrind are installed.
#   bench.sh all        main, loop, overload and profile, one after the other, into one run folder.
#   bench.sh stop       stops processes left behind by a run that was killed hard (by recorded PID).
#   bench.sh help       this text.
#
# Layout (2 cores): wrk and the upstream share LOADGEN_CPU (0), the proxy under test owns
# PROXY_CPU (1). Every wrk request carries `x-api-key: bench-key`, the key the auth policy knows.
#
# Environment knobs [defaults]:
#   RUNS [5]            rounds                        DURATION [10]  seconds per measured wrk run
#   WARMUP [2]          seconds of discarded warm-up before each measured run
#   CONNS [50]          wrk connections               THREADS [1]    wrk threads
#   URL_PATH [/api/hello] request path of main; the transform policy rewrites /api to / upstream
#   PIN [1]             pin with taskset (0 = off)   LOADGEN_CPU [0] PROXY_CPU [1] UPSTREAM_CPU [0]
#   NICE [0]            nice value of everything started; e.g. -15 as root. With autogroup
#                       scheduling on, the session's autogroup gets it too (restored at exit).
#   WAIT_IDLE [0]       before each run wait up to this many seconds for the rest of the machine
#                       to be idle, and redo (twice at most) a run that other processes disturbed
#   SKIP_BUILD [0]      1 = use the existing target/release/sluice and plugins
#   PERF_DIR [<workspace>/target/bench]
#   UPSTREAM_PORT [9000] NGINX_PORT [9001] SLUICE_PORT [9003] SLUICE_ADMIN_PORT [9903] SLOW_PORT [9005]
#   loop:     LOOP_CONNS [4] LOOP_DEADLINE_MS [100]
#   overload: SLOW_DELAY_MS [100] SLOW_LIMIT [10] OVERLOAD_QUEUED [10] OVERLOAD_FACTOR [10]
#             OVERLOAD_CONNS [100] OVERLOAD_DURATION [10] OVERLOAD_ROUNDS [3]
#
# Columns of the main table (medians over the rounds):
#   req/s, p50, p99     wrk's figures
#   CPU us/req          CPU time (user + system, from /proc/PID/stat, all threads) of the target's
#                       processes during the measured run, divided by the requests served; for
#                       `upstream` it is the upstream nginx itself. Kernel work done in the
#                       target's context is in it, including the loopback TCP receive processing
#                       its own sends trigger; softirq work run elsewhere is not (raw column 14).
#   peak RSS            VmHWM from /proc/PID/status at the end of the run; the largest over the
#                       target's processes (the nginx worker). Sluice's includes its start-up,
#                       when it compiles the plugins; `RSS end` is VmRSS at the end of the run.
#   x nginx             the target's figure divided by nginx's in the same round, median over rounds
#   proxy core %        CPU use of the target's processes (100 = one core)
#   wrk+up core %       CPU use of wrk and the upstream; near 100 the load-generator core, not the
#                       target, is the limit, and req/s says little (CPU us/req still holds)
#   other %             CPU that processes outside the rig got on the target's core / on wrk's
#                       core; the first should be ~0. The second is harmless while the rig leaves
#                       that core partly idle (wrk+up core % well below 100).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
case ${CARGO_TARGET_DIR:-} in
  "") TARGET_DIR=$ROOT/target ;;
  /*) TARGET_DIR=$CARGO_TARGET_DIR ;;
  *) TARGET_DIR=$ROOT/$CARGO_TARGET_DIR ;;
esac
SLUICE_BIN=$TARGET_DIR/release/sluice
PLUGIN_DIR=$TARGET_DIR/wasm32-wasip2/plugin

PERF_DIR=${PERF_DIR:-$TARGET_DIR/bench}
RUNS=${RUNS:-5}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}
URL_PATH=${URL_PATH:-/api/hello}
PIN=${PIN:-1}
LOADGEN_CPU=${LOADGEN_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
UPSTREAM_CPU=${UPSTREAM_CPU:-0}
WAIT_IDLE=${WAIT_IDLE:-0}
NICE=${NICE:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
UPSTREAM_PORT=${UPSTREAM_PORT:-9000}
NGINX_PORT=${NGINX_PORT:-9001}
SLUICE_PORT=${SLUICE_PORT:-9003}
SLUICE_ADMIN_PORT=${SLUICE_ADMIN_PORT:-9903}
SLOW_PORT=${SLOW_PORT:-9005}
LOOP_CONNS=${LOOP_CONNS:-4}
LOOP_DEADLINE_MS=${LOOP_DEADLINE_MS:-100}
SLOW_DELAY_MS=${SLOW_DELAY_MS:-100}
SLOW_LIMIT=${SLOW_LIMIT:-10}
OVERLOAD_QUEUED=${OVERLOAD_QUEUED:-10}
OVERLOAD_FACTOR=${OVERLOAD_FACTOR:-10}
OVERLOAD_CONNS=${OVERLOAD_CONNS:-100}
OVERLOAD_DURATION=${OVERLOAD_DURATION:-10}
OVERLOAD_ROUNDS=${OVERLOAD_ROUNDS:-3}
API_KEY=bench-key
ACTIVE_PIDS="$PERF_DIR/run/active.pids"
CLK_TCK=$(getconf CLK_TCK)
export PATH="$PATH:/usr/sbin:/sbin" # nginx lives in /usr/sbin

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- process bookkeeping
STARTED_PIDS=()

pin_cmd() { # $1 = cpu -> PIN_CMD=(nice -n N taskset -c CPU), either part left out when not wanted
  PIN_CMD=()
  if [[ $NICE != 0 ]]; then PIN_CMD+=(nice -n "$NICE"); fi
  if [[ $PIN == 1 ]]; then PIN_CMD+=(taskset -c "$1"); fi
}

children_of() { # direct children of a PID: scan /proc/*/stat for ppid == PID (no name matching)
  local p=$1
  awk -v p="$p" 'FNR==1 { line=$0; sub(/^.*\) /, "", line); split(line, f, " ");
                          if (f[2] == p) { n=FILENAME; gsub(/[^0-9]/, "", n); print n } }' \
      /proc/[0-9]*/stat 2>/dev/null || true
}

pid_tree() { # PID plus all descendants
  local p=$1 c
  [[ -n $p && -d /proc/$p ]] || return 0
  echo "$p"
  for c in $(children_of "$p"); do pid_tree "$c"; done
}

stop_pid() { # TERM, wait up to 5 s, then KILL; also any leftover descendants
  local p=$1 tree i q
  [[ -d /proc/$p ]] || return 0
  tree=$(pid_tree "$p")
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 1 50); do [[ -d /proc/$p ]] || break; sleep 0.1; done
  for q in $tree; do
    if [[ -d /proc/$q ]]; then kill -KILL "$q" 2>/dev/null || true; fi
  done
  wait "$p" 2>/dev/null || true
}

remember_pid() { STARTED_PIDS+=("$1"); echo "$1" >>"$ACTIVE_PIDS"; }

stop_started() { # stop one started process and forget it, so its PID is never signalled again
  local p=$1 kept=() q
  stop_pid "$p"
  for q in "${STARTED_PIDS[@]}"; do [[ $q == "$p" ]] || kept+=("$q"); done
  STARTED_PIDS=(${kept[@]+"${kept[@]}"})
  sed -i "/^$p\$/d" "$ACTIVE_PIDS" 2>/dev/null || true
}

stop_all_started() {
  local i
  for ((i=${#STARTED_PIDS[@]}-1; i>=0; i--)); do stop_started "${STARTED_PIDS[$i]}"; done
}

CURRENT_LOAD_PID=""
run_load() { # out_file cmd... : run a (time-bounded) load command in the background, record its PID, wait
  local out=$1; shift
  "$@" >"$out" 2>&1 </dev/null &
  CURRENT_LOAD_PID=$!
  echo "$CURRENT_LOAD_PID" >>"$ACTIVE_PIDS"
  wait "$CURRENT_LOAD_PID" || true
  sed -i "/^$CURRENT_LOAD_PID\$/d" "$ACTIVE_PIDS" 2>/dev/null || true
  CURRENT_LOAD_PID=""
}

AG_OLD=""
cleanup() {
  if [[ -n $AG_OLD ]]; then echo "$AG_OLD" >/proc/$$/autogroup 2>/dev/null || true; fi
  if [[ -n $CURRENT_LOAD_PID ]]; then stop_pid "$CURRENT_LOAD_PID"; fi
  if ((${#STARTED_PIDS[@]})); then
    log "stopping ${#STARTED_PIDS[@]} started process(es) by PID: ${STARTED_PIDS[*]}"
    stop_all_started
  fi
  rm -f "$ACTIVE_PIDS"
}

stop_leftovers() { # `bench.sh stop`: kill PIDs recorded by a run that was killed hard
  [[ -f $ACTIVE_PIDS ]] || { log "nothing recorded in $ACTIVE_PIDS"; return 0; }
  local p
  while read -r p; do
    [[ $p =~ ^[0-9]+$ ]] || continue
    # only touch the PID if it still is one of ours (its command line names the run folder, or it is our wrk)
    if [[ -d /proc/$p ]] && tr '\0' ' ' </proc/"$p"/cmdline | grep -qE "$PERF_DIR/run/|wrk -t[0-9]+ -c[0-9]+ -d[0-9]+s"; then
      log "stopping leftover PID $p"; stop_pid "$p"
    fi
  done <"$ACTIVE_PIDS"
  rm -f "$ACTIVE_PIDS"
}

port_listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

wait_port() { # $1 port, $2 pid (must stay alive), $3 seconds [10]
  local i
  for i in $(seq 1 $(( ${3:-10} * 10 ))); do
    port_listening "$1" && return 0
    [[ -n ${2:-} && ! -d /proc/$2 ]] && return 1
    sleep 0.1
  done
  return 1
}

cpu_ticks() { # sum utime+stime over the given PIDs (each /proc/PID/stat covers all its threads)
  local total=0 p s
  for p in "$@"; do
    [[ -r /proc/$p/stat ]] || continue
    s=$(sed 's/^.*) //' /proc/"$p"/stat 2>/dev/null) || continue
    # after stripping "pid (comm) ", field 12 = utime, 13 = stime
    total=$((total + $(awk '{print $12 + $13}' <<<"$s")))
  done
  echo "$total"
}

status_kib() { # field (VmHWM, VmRSS) -> largest value in KiB over the given PIDs
  local field=$1; shift
  local p v max=0
  for p in "$@"; do
    v=$(awk -v f="$field:" '$1==f {print $2}' /proc/"$p"/status 2>/dev/null || true)
    [[ -n $v ]] && ((v > max)) && max=$v
  done
  ((max > 0)) && echo "$max" || echo NaN
}

sys_busy_ticks() { # user+nice+system ticks; $1 = comma-separated CPU list (empty = all CPUs)
  awk -v set=",${1:-}," '
    set == ",," && /^cpu / { print $2 + $3 + $4; exit }
    set != ",," && /^cpu[0-9]/ { n = substr($1, 4); if (index(set, "," n ",")) t += $2 + $3 + $4 }
    END { if (set != ",,") print t + 0 }' /proc/stat
}

softirq_ticks() { # softirq ticks (kernel network processing is accounted here, not to processes)
  awk -v set=",${1:-}," '
    set == ",," && /^cpu / { print $8; exit }
    set != ",," && /^cpu[0-9]/ { n = substr($1, 4); if (index(set, "," n ",")) t += $8 }
    END { if (set != ",,") print t + 0 }' /proc/stat
}

rig_cpus() { # CPUs a measurement runs on ($1 = 1 when the proxy core takes part)
  [[ $PIN == 1 ]] || { echo ""; return; }
  if [[ $1 == 1 ]]; then echo "$LOADGEN_CPU,$UPSTREAM_CPU,$PROXY_CPU"; else echo "$LOADGEN_CPU,$UPSTREAM_CPU"; fi
}

children_ticks() { # CPU ticks of this shell's reaped children (wrk, via timeout), from `times`.
  # `times` must run in THIS shell (a $(...) subshell has its own, empty, child accounting)
  times >"$RUN_DIR/.times"
  CHILD_TICKS=$(awk -v hz="$CLK_TCK" 'NR==2 { t=0; for (i=1;i<=2;i++) { split($i, a, "m"); sub(/s$/, "", a[2]); t += a[1]*60 + a[2] } printf "%.0f", t*hz }' "$RUN_DIR/.times")
}

# ---------------------------------------------------------------- tools and build
install_packages() { # apt package names
  local sudo=""
  if ((EUID != 0)); then
    sudo -n true 2>/dev/null || die "missing packages ($*) and not root: apt-get install -y $*"
    sudo="sudo -n"
  fi
  log "installing from Debian's packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y "$@" || { $sudo apt-get update && $sudo apt-get install -y "$@"; }
}

ensure_tools() { # $1 = 1 when python3 is needed
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v curl >/dev/null || missing+=(curl)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v taskset >/dev/null || missing+=(util-linux)
  [[ ${1:-0} == 1 ]] && ! command -v python3 >/dev/null && missing+=(python3)
  if ! command -v nginx >/dev/null; then
    install_packages nginx-light "${missing[@]}" || install_packages nginx "${missing[@]}"
  elif ((${#missing[@]})); then
    install_packages "${missing[@]}"
  fi
  for tool in nginx wrk curl ss taskset timeout; do
    command -v "$tool" >/dev/null || die "missing tool after install: $tool"
  done
}

build_sluice() {
  if [[ $SKIP_BUILD == 1 ]]; then
    log "SKIP_BUILD=1: using the existing $SLUICE_BIN and plugins"
  else
    local cargo=${CARGO:-cargo}
    log "building: cargo build --release -p sluice; cargo xtask build-plugins"
    (cd "$ROOT" && "$cargo" build --release -p sluice && "$cargo" xtask build-plugins) >&2 \
      || die "build failed"
  fi
  [[ -x $SLUICE_BIN ]] || die "no $SLUICE_BIN (build it, or drop SKIP_BUILD)"
  for p in auth transform throttle chaos; do
    [[ -f $PLUGIN_DIR/$p.wasm ]] || die "no $PLUGIN_DIR/$p.wasm (cargo xtask build-plugins)"
  done
}

# ---------------------------------------------------------------- configs
write_nginx_configs() {
  local d=$RUN_DIR
  mkdir -p "$d"/upstream/tmp "$d"/nginx/tmp
  cat >"$d/upstream/nginx.conf" <<EOF
# upstream: fixed tiny response
worker_processes 1;
pid $d/upstream/nginx.pid;
error_log $d/upstream/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $d/upstream/tmp/body;
    proxy_temp_path       $d/upstream/tmp/proxy;
    fastcgi_temp_path     $d/upstream/tmp/fastcgi;
    uwsgi_temp_path       $d/upstream/tmp/uwsgi;
    scgi_temp_path        $d/upstream/tmp/scgi;
    keepalive_timeout 65s;
    keepalive_requests 100000000;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT backlog=4096;
        location / {
            default_type text/plain;
            return 200 "ok";
        }
    }
}
EOF
  cat >"$d/nginx/nginx.conf" <<EOF
# nginx reverse proxy with upstream keepalive
worker_processes 1;
pid $d/nginx/nginx.pid;
error_log $d/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $d/nginx/tmp/body;
    proxy_temp_path       $d/nginx/tmp/proxy;
    fastcgi_temp_path     $d/nginx/tmp/fastcgi;
    uwsgi_temp_path       $d/nginx/tmp/uwsgi;
    scgi_temp_path        $d/nginx/tmp/scgi;
    keepalive_timeout 65s;
    keepalive_requests 100000000;
    upstream backend {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 128;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

sluice_head() { # upstream_port upstream_max_in_flight -> the tables every Sluice config shares
  cat <<EOF
# Written by bench/bench.sh.
[listener]
address = "127.0.0.1:$SLUICE_PORT"
shutdown_grace_ms = 1000

[admin]
address = "127.0.0.1:$SLUICE_ADMIN_PORT"

[[upstreams]]
name = "backend"
targets = ["127.0.0.1:$1"]
max_in_flight = $2
EOF
}

# One route without policies, one with the three bundled ones; limits high enough that nothing
# waits or is refused, so the bench measures the proxy, not the queues.
write_sluice_main_configs() {
  local d=$RUN_DIR/sluice
  mkdir -p "$d"
  { sluice_head "$UPSTREAM_PORT" 4096; cat <<EOF

[[routes]]
name = "plain"
path_prefix = "/"
upstream = "backend"
max_in_flight = 4096
max_queued = 4096
EOF
  } >"$d/plain.toml"
  { sluice_head "$UPSTREAM_PORT" 4096; cat <<EOF

[[plugins]]
name = "transform"
path = "$PLUGIN_DIR/transform.wasm"
max_instances = 64
[plugins.config]
request = { set = { "x-bench" = "sluice" }, remove = ["x-sluice-identity"] }
response = { set = { "x-served-by" = "sluice" } }
rewrite = { prefix = "/api", replacement = "/" }

[[plugins]]
name = "auth"
path = "$PLUGIN_DIR/auth.wasm"
max_instances = 64
[plugins.config]
api_keys = { header = "x-api-key", keys = { "$API_KEY" = "bench-user" } }

[[plugins]]
name = "throttle"
path = "$PLUGIN_DIR/throttle.wasm"
max_instances = 64
[plugins.config]
key = "identity"
limit = 100000000
period = "1s"

[[routes]]
name = "policies"
path_prefix = "/"
upstream = "backend"
policies = ["transform", "auth", "throttle"]
max_in_flight = 4096
max_queued = 4096
EOF
  } >"$d/policies.toml"
}

write_sluice_loop_config() {
  local d=$RUN_DIR/sluice
  mkdir -p "$d"
  { sluice_head "$UPSTREAM_PORT" 4096; cat <<EOF

# Loops until its deadline on every call; the fuel is far more than the deadline lets it burn.
[[plugins]]
name = "chaos"
path = "$PLUGIN_DIR/chaos.wasm"
on_error = "deny"
deadline_ms = $LOOP_DEADLINE_MS
fuel = 1000000000000
max_instances = 64
config = { mode = "loop" }

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "backend"
max_in_flight = 4096
max_queued = 4096

[[routes]]
name = "loop"
path_prefix = "/loop"
upstream = "backend"
policies = ["chaos"]
max_in_flight = 4096
max_queued = 4096
EOF
  } >"$d/loop.toml"
}

write_overload_configs() {
  local d=$RUN_DIR/sluice
  mkdir -p "$d" "$RUN_DIR/slow"
  { sluice_head "$SLOW_PORT" 4096; cat <<EOF

# The upstream serves $SLOW_LIMIT at once, $SLOW_DELAY_MS ms each; so does this route.
[[routes]]
name = "slow"
path_prefix = "/"
upstream = "backend"
max_in_flight = $SLOW_LIMIT
max_queued = $OVERLOAD_QUEUED
queue_timeout_ms = 1000
EOF
  } >"$d/overload.toml"

  cat >"$RUN_DIR/slow/slow.py" <<'EOF'
"""A slow HTTP/1.1 upstream: answers `ok` after DELAY ms, at most LIMIT requests at once."""
import asyncio
import sys

PORT, DELAY_MS, LIMIT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


async def serve(reader, writer, slots):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            async with slots:
                await asyncio.sleep(DELAY_MS / 1000)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    slots = asyncio.Semaphore(LIMIT)
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, slots), "127.0.0.1", PORT, backlog=4096
    )
    async with server:
        await server.serve_forever()


asyncio.run(main())
EOF

  # wrk keeps no per-status latency: with one connection per thread, request() and response()
  # of a thread alternate, so the time between them is that request's latency.
  cat >"$RUN_DIR/slow/record.lua" <<'EOF'
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local now = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, now) -- CLOCK_MONOTONIC
  return tonumber(now.tv_sec) * 1e6 + tonumber(now.tv_nsec) / 1e3
end

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

local out, started, pause
function init(args)
  out = assert(io.open(os.getenv("BENCH_LAT_DIR") .. "/lat-" .. id .. ".txt", "w"))
  out:setvbuf("line")
  pause = tonumber(os.getenv("BENCH_DELAY_MS"))
end

function delay() return pause end

function request()
  started = now_us()
  return wrk.request()
end

function response(status, headers, body)
  local reason = "-"
  if status ~= 200 then reason = string.match(body or "", '"error":"([%w_]+)"') or "-" end
  out:write(string.format("%d %.1f %s\n", status, now_us() - started, reason))
end
EOF
}

# ---------------------------------------------------------------- starting processes
PID_upstream=""; PID_nginx=""; PID_sluice=""
start_nginx() { # name cpu -> PID_<name>
  local name=$1 cpu=$2 d=$RUN_DIR/$1 pid
  nginx -t -q -p "$d" -c "$d/nginx.conf" -e "$d/error.log" || die "nginx config test failed for $name"
  pin_cmd "$cpu"
  "${PIN_CMD[@]}" nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" -g 'daemon off;' \
    >"$d/stdout.log" 2>&1 </dev/null &
  pid=$!
  remember_pid "$pid"
  printf -v "PID_$name" '%s' "$pid"
}

start_upstream() {
  port_listening "$UPSTREAM_PORT" && die "port $UPSTREAM_PORT already in use (leftover run? try: $0 stop)"
  start_nginx upstream "$UPSTREAM_CPU"
  wait_port "$UPSTREAM_PORT" "$PID_upstream" || die "upstream did not start (see $RUN_DIR/upstream/error.log)"
}

SLUICE_STARTS=0
start_sluice() { # config name -> PID_sluice, once the listener is up
  local cfg=$RUN_DIR/sluice/$1.toml log
  SLUICE_STARTS=$((SLUICE_STARTS + 1))
  log=$RUN_DIR/sluice/$1-$SLUICE_STARTS.log
  port_listening "$SLUICE_PORT" && die "port $SLUICE_PORT already in use"
  port_listening "$SLUICE_ADMIN_PORT" && die "port $SLUICE_ADMIN_PORT already in use"
  pin_cmd "$PROXY_CPU"
  "${PIN_CMD[@]}" "$SLUICE_BIN" run --config "$cfg" --workers 1 >"$log" 2>&1 </dev/null &
  PID_sluice=$!
  remember_pid "$PID_sluice"
  # Sluice compiles every plugin before it binds: a listening port means it is ready.
  wait_port "$SLUICE_PORT" "$PID_sluice" 120 || die "sluice did not start on $SLUICE_PORT (see $log)"
}

stop_sluice() { stop_started "$PID_sluice"; PID_sluice=""; }

sluice_threads() { # the runtime's threads, by name, e.g. "tokio-runtime-w:1 sluice-epoch:1"
  cat /proc/"$1"/task/*/comm 2>/dev/null | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}'
}

# ---------------------------------------------------------------- measurement
to_ms() { # wrk latency token (e.g. 402.00us, 1.23ms, 1.20s) -> milliseconds
  awk -v v="$1" 'BEGIN{
    if (v ~ /us$/) {sub(/us$/,"",v); printf "%.3f", v/1000}
    else if (v ~ /ms$/) {sub(/ms$/,"",v); printf "%.3f", v}
    else if (v ~ /m$/) {sub(/m$/,"",v); printf "%.3f", v*60000}
    else if (v ~ /s$/) {sub(/s$/,"",v); printf "%.3f", v*1000}
    else printf "NaN"}'
}

median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "NaN"; exit} if(NR%2){print a[(NR+1)/2]} else {printf "%.6g\n",(a[NR/2]+a[NR/2+1])/2}}'; }

wait_idle() { # wait up to WAIT_IDLE s until CPU use outside the rig is < 5% (the rig is idle between runs)
  ((WAIT_IDLE > 0)) || return 0
  local deadline=$((SECONDS + WAIT_IDLE)) a b busy
  while :; do
    a=$(sys_busy_ticks); sleep 2; b=$(sys_busy_ticks)
    busy=$(( (b - a) * 100 / 2 / CLK_TCK ))
    ((busy < 5)) && return 0
    if ((SECONDS >= deadline)); then log "machine still busy (${busy}% CPU outside the rig) after ${WAIT_IDLE}s - measuring anyway"; return 0; fi
    sleep 3
  done
}

run_wrk() { # out connections duration url [wrk args...]: wrk on the load-generator core, bounded in time
  local out=$1 conns=$2 duration=$3 url=$4
  shift 4
  pin_cmd "$LOADGEN_CPU"
  # NB: wrk only sends a -H header written as "name: value", with the space.
  run_load "$out" timeout $((duration + 20)) "${PIN_CMD[@]}" \
    wrk -t"$THREADS" -c"$conns" -d"$duration"s --latency -H "x-api-key: $API_KEY" "$@" "$url"
}

# measure NAME PORT ROUND PID PATH PROXIED -> appends a row to $RUN_DIR/raw-<scenario>.tsv
# PID is the target's top process (its descendants count too); PROXIED=1 when the target runs on
# the proxy core. Columns: name port round rps p50 p99 errors status cpu% us/req up_cpu%
# other%_target_core wrk_cpu% softirq% hwm_kib rss_kib requests other%_wrk_core
# shellcheck disable=SC2086 # PID lists are meant to split into words
measure() {
  local name=$1 port=$2 run=$3 pid=$4 path=$5 proxied=$6 url code out tgt_pids up_pids
  local t0 t1 u0 u1 q0 q1 c0 c1 cpus start end rps p50 p99 reqs errs hwm rss core
  local -A busy0=() busy1=() mine=()
  url="http://127.0.0.1:$port$path"
  code=$(curl -s -m 3 -o /dev/null -w '%{http_code}' -H "x-api-key: $API_KEY" "$url" || true)
  if [[ "$code" != "200" ]]; then
    log "$name: sanity request to $url returned '$code' - skipped"
    printf '%s\t%s\t%s\tNaN\tNaN\tNaN\tNaN\tsanity:%s\tNaN\tNaN\tNaN\tNaN\tNaN\tNaN\tNaN\tNaN\t0\tNaN\n' "$name" "$port" "$run" "$code" >>"$RAW"
    return 0
  fi
  tgt_pids=$(pid_tree "$pid"); up_pids=$(pid_tree "$PID_upstream")
  [[ $name == upstream ]] && up_pids=""
  wait_idle
  if ((WARMUP > 0)); then run_wrk /dev/null "$CONNS" "$WARMUP" "$url"; fi
  out="$RUN_DIR/wrk-$SCENARIO-$name-run$run.txt"
  cpus=$(rig_cpus "$proxied")
  local tgt_core=$PROXY_CPU wrk_core=$LOADGEN_CPU cores
  [[ $proxied == 1 ]] || tgt_core=$UPSTREAM_CPU
  [[ $PIN == 1 ]] || { tgt_core=all; wrk_core=all; }
  cores=$(printf '%s\n' "$tgt_core" "$wrk_core" "$UPSTREAM_CPU" | sort -u)
  [[ $PIN == 1 ]] || cores=all
  for core in $cores; do busy0[$core]=$(sys_busy_ticks "${core/all/}"); done
  t0=$(cpu_ticks $tgt_pids); u0=$(cpu_ticks $up_pids); q0=$(softirq_ticks "$cpus"); children_ticks; c0=$CHILD_TICKS; start=$(date +%s.%N)
  run_wrk "$out" "$CONNS" "$DURATION" "$url"
  end=$(date +%s.%N); t1=$(cpu_ticks $tgt_pids); u1=$(cpu_ticks $up_pids); q1=$(softirq_ticks "$cpus"); children_ticks; c1=$CHILD_TICKS
  for core in $cores; do busy1[$core]=$(sys_busy_ticks "${core/all/}"); done
  hwm=$(status_kib VmHWM $tgt_pids); rss=$(status_kib VmRSS $tgt_pids)
  rps=$(awk '/^Requests\/sec:/{print $2}' "$out"); rps=${rps:-NaN}
  p50=$(awk '/Latency Distribution/{f=1;next} f&&$1=="50%"{print $2; exit}' "$out")
  p99=$(awk '/Latency Distribution/{f=1;next} f&&$1=="99%"{print $2; exit}' "$out")
  p50=$(to_ms "${p50:-x}"); p99=$(to_ms "${p99:-x}")
  reqs=$(awk '/requests in/{print $1; exit}' "$out"); reqs=${reqs:-0}
  errs=$(awk '/Non-2xx/{n+=$NF} /Socket errors/{gsub(/,/,""); n+=$4+$6+$8+$10} END{print n+0}' "$out")
  local el tcpu ucpu usreq ocpu owrk lcpu qcpu
  el=$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')
  pct() { awk -v d="$1" -v hz="$CLK_TCK" -v e="$el" 'BEGIN{ if(e>0){v=100*d/hz/e; if(v<0)v=0; printf "%.0f", v} else print "NaN"}'; }
  tcpu=$(pct $((t1 - t0))); ucpu=$(pct $((u1 - u0))); lcpu=$(pct $((c1 - c0))); qcpu=$(pct $((q1 - q0)))
  usreq=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN{ if(n>0) printf "%.1f", 1e6*d/hz/n; else print "NaN"}')
  # Contamination: CPU time that processes outside the rig got on each rig core. On a core the
  # rig keeps busy it was taken from the rig; on one the rig leaves partly idle (the wrk core,
  # when the target is the bottleneck) it is mostly idle time others used, and does no harm.
  mine[$tgt_core]=$(( ${mine[$tgt_core]:-0} + t1 - t0 ))
  mine[$UPSTREAM_CPU]=$(( ${mine[$UPSTREAM_CPU]:-0} + u1 - u0 ))
  mine[$wrk_core]=$(( ${mine[$wrk_core]:-0} + c1 - c0 ))
  [[ $PIN == 1 ]] || mine[all]=$(( (t1 - t0) + (u1 - u0) + (c1 - c0) ))
  ocpu=$(pct $(( busy1[$tgt_core] - busy0[$tgt_core] - mine[$tgt_core] )))
  owrk=$(pct $(( busy1[$wrk_core] - busy0[$wrk_core] - mine[$wrk_core] )))
  LAST_DISTURBED=$(awk -v o="$ocpu" -v w="$owrk" -v r="$(pct "${mine[$wrk_core]}")" \
    'BEGIN{print (o+0 > 10 || (w+0 > 10 && r+0 > 80)) ? 1 : 0}')
  [[ -z $tgt_pids ]] && { tcpu=NaN; usreq=NaN; }
  # NB: in a VM the tick accounting can jump (once seen: a pinned process at 622% of a core);
  # a run where any one core looks more than fully used is treated as disturbed.
  if [[ $PIN == 1 ]] && awk -v a="$tcpu" -v b="$ocpu" -v c="$owrk" 'BEGIN{exit !(a+0 > 105 || b+0 > 105 || c+0 > 105)}'; then
    log "  WARNING: implausible CPU accounting (target ${tcpu}% of its one core)"
    LAST_IMPLAUSIBLE=1
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$port" "$run" "$rps" "$p50" "$p99" "$errs" \
    "$tcpu" "$usreq" "$ucpu" "$ocpu" "$lcpu" "$qcpu" "$hwm" "$rss" "$reqs" "$owrk" >>"$RAW"
  log "  $name: $rps req/s, p50 $p50 ms, p99 $p99 ms, $usreq us/req, errors $errs, other CPU on target/wrk core $ocpu%/$owrk%"
  if ((errs > 0)); then log "  WARNING: $name answered $errs requests with non-2xx or errors (see $out)"; fi
}

measure_redo() { # measure, and redo (twice at most) a run that other processes disturbed (WAIT_IDLE>0)
  local tries=1        # or whose CPU accounting cannot be right
  LAST_DISTURBED=0; LAST_IMPLAUSIBLE=0
  measure "$@"
  while ((tries < 3 && (LAST_IMPLAUSIBLE || (WAIT_IDLE > 0 && LAST_DISTURBED)))); do
    log "  disturbed (other processes took over 10% of a core the rig needed, or implausible accounting): redoing"
    LAST_DISTURBED=0; LAST_IMPLAUSIBLE=0
    tail -n 1 "$RAW" >>"${RAW%.tsv}-discarded.tsv"; sed -i '$d' "$RAW"
    measure "$@"; tries=$((tries + 1))
  done
}

# ---------------------------------------------------------------- report helpers
col() { # name column -> median over rounds
  awk -F'\t' -v n="$1" -v c="$2" '$1==n && $c!="NaN" && $c!="" {print $c}' "$RAW" | median
}
vs() { # name column reference -> median over rounds of (value / reference's value in the same round)
  awk -F'\t' -v n="$1" -v c="$2" -v r="$3" '
    NR==FNR { if ($1==r && $c!="NaN" && $c+0>0) ref[$3]=$c; next }
    $1==n && $c!="NaN" && ($3 in ref) { print $c/ref[$3] }' "$RAW" "$RAW" | median
}
range() { # name column -> "min-max" over rounds
  awk -F'\t' -v n="$1" -v c="$2" '$1==n && $c!="NaN" { v=$c+0; if (!k++ || v<lo) lo=v; if (v>hi) hi=v }
    END { if (k) printf "%.0f-%.0f", lo, hi; else print "n/a" }' "$RAW"
}
fmt() { awk -v v="$1" -v f="$2" 'BEGIN{ if (v=="NaN" || v=="") print "n/a"; else printf f, v }'; }
mib() { awk -v v="$1" 'BEGIN{ if (v=="NaN" || v=="") print "n/a"; else printf "%.1f", v/1024 }'; }

source_state() { # the commit, and whether the gateway's sources differ from it (at build time)
  local commit
  commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  if ! git -C "$ROOT" diff --quiet HEAD -- host plugins plugin-sdk ratelimit wit 2>/dev/null \
    || [[ -n $(git -C "$ROOT" ls-files --others --exclude-standard -- host plugins plugin-sdk ratelimit wit 2>/dev/null) ]]; then
    commit="$commit, with uncommitted changes in the gateway's sources"
  fi
  echo "$commit; binary built $(date -u -r "$SLUICE_BIN" '+%Y-%m-%d %H:%M UTC')"
}

machine_header() {
  local model
  model=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
  cat <<EOF
- date: $(date -u '+%Y-%m-%d %H:%M UTC')
- machine: $(nproc) CPUs, ${model:-unknown CPU}, Linux $(uname -r)
- commit: $SOURCE_STATE
- $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}')
- layout: $([[ $PIN == 1 ]] && echo "wrk and upstream on CPU $LOADGEN_CPU/$UPSTREAM_CPU, proxy under test on CPU $PROXY_CPU" || echo "no pinning"); nice $NICE
EOF
}

# ---------------------------------------------------------------- scenario: main
scenario_main() {
  local targets=("$@") names=() n i run k
  ((${#targets[@]})) || targets=(upstream nginx sluice sluice-policies)
  for n in "${targets[@]}"; do
    case $n in upstream|direct|nginx|sluice|sluice-policies) ;; *) die "unknown target '$n' (upstream nginx sluice sluice-policies)" ;; esac
  done
  [[ " ${targets[*]} " == *" nginx "* ]] || targets=(nginx "${targets[@]}")
  for n in "${targets[@]}"; do [[ $n == direct ]] && n=upstream; names+=("$n"); done

  SCENARIO=main; RAW=$RUN_DIR/raw-main.tsv; : >"$RAW"
  write_nginx_configs; write_sluice_main_configs
  start_upstream
  port_listening "$NGINX_PORT" && die "port $NGINX_PORT already in use"
  start_nginx nginx "$PROXY_CPU"
  wait_port "$NGINX_PORT" "$PID_nginx" || die "nginx proxy did not start (see $RUN_DIR/nginx/error.log)"

  log "main: wrk -t$THREADS -c$CONNS -d${DURATION}s (warm-up ${WARMUP}s) x $RUNS rounds, path $URL_PATH, targets: ${names[*]}"
  for run in $(seq 1 "$RUNS"); do
    for k in "${!names[@]}"; do
      i=$(( (k + run - 1) % ${#names[@]} ))
      n=${names[$i]}
      log "round $run/$RUNS: $n"
      case $n in
        upstream) measure_redo upstream "$UPSTREAM_PORT" "$run" "$PID_upstream" "$URL_PATH" 0 ;;
        nginx) measure_redo nginx "$NGINX_PORT" "$run" "$PID_nginx" "$URL_PATH" 1 ;;
        sluice|sluice-policies)
          if [[ $n == sluice ]]; then start_sluice plain; else start_sluice policies; fi
          log "  sluice PID $PID_sluice threads: $(sluice_threads "$PID_sluice")"
          if [[ $n == sluice-policies ]]; then
            code=$(curl -s -m 3 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$SLUICE_PORT$URL_PATH" || true)
            [[ $code == 401 ]] || log "  WARNING: without the API key sluice-policies answered '$code', not 401"
          fi
          measure_redo "$n" "$SLUICE_PORT" "$run" "$PID_sluice" "$URL_PATH" 1
          curl -s -m 3 "http://127.0.0.1:$SLUICE_ADMIN_PORT/metrics" >"$RUN_DIR/sluice/$n-run$run.metrics" || true
          stop_sluice ;;
      esac
    done
  done
  stop_all_started
  report_main "${names[@]}" >"$RUN_DIR/results-main.md"
}

report_main() {
  cat <<EOF
## Side by side: $RUNS rounds of ${DURATION} s, wrk -c$CONNS -t$THREADS, GET $URL_PATH

| target | req/s | req/s range | p50 ms | p99 ms | CPU us/req | peak RSS MiB | RSS end MiB | req/s x nginx | CPU/req x nginx | p99 x nginx | non-2xx + errors | proxy core % | wrk+up core % | other % target / wrk core |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
EOF
  local n
  for n in "$@"; do
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$n" \
      "$(fmt "$(col "$n" 4)" %.0f)" "$(range "$n" 4)" "$(fmt "$(col "$n" 5)" %.3f)" "$(fmt "$(col "$n" 6)" %.3f)" \
      "$(fmt "$(col "$n" 10)" %.1f)" "$(mib "$(col "$n" 15)")" "$(mib "$(col "$n" 16)")" \
      "$(fmt "$(vs "$n" 4 nginx)" %.2f)" "$(fmt "$(vs "$n" 10 nginx)" %.2f)" "$(fmt "$(vs "$n" 6 nginx)" %.2f)" \
      "$(fmt "$(col "$n" 7)" %.0f)" \
      "$( [[ $n == upstream ]] && echo - || fmt "$(col "$n" 9)" %.0f)" \
      "$( [[ $n == upstream ]] && fmt "$(col "$n" 13)" %.0f || fmt "$(awk -F'\t' -v n="$n" '$1==n && $11!="NaN" {print $11+$13}' "$RAW" | median)" %.0f)" \
      "$(fmt "$(col "$n" 12)" %.0f) / $(fmt "$(col "$n" 18)" %.0f)"
  done
  cat <<EOF

Medians over the rounds; "x nginx" is the ratio to nginx measured in the same round, median over
rounds. For \`upstream\` the CPU figures are the upstream nginx's own; its "wrk+up core %" is wrk
alone. Raw figures per round: \`raw-main.tsv\`; wrk output: \`wrk-main-*.txt\`.
EOF
}

# ---------------------------------------------------------------- scenario: loop
scenario_loop() {
  local run bg out
  SCENARIO=loop; RAW=$RUN_DIR/raw-loop.tsv; : >"$RAW"
  write_nginx_configs; write_sluice_loop_config
  start_upstream
  start_sluice loop
  log "loop: /plain measured alone and beside $LOOP_CONNS connections on /loop (a policy looping until its ${LOOP_DEADLINE_MS} ms deadline), $RUNS rounds"
  for run in $(seq 1 "$RUNS"); do
    log "round $run/$RUNS: /plain alone"
    measure_redo plain-alone "$SLUICE_PORT" "$run" "$PID_sluice" /plain 1
    log "round $run/$RUNS: /plain beside the looping policy"
    out=$RUN_DIR/wrk-loop-background-run$run.txt
    pin_cmd "$LOADGEN_CPU"
    timeout $((WARMUP + DURATION + 30)) "${PIN_CMD[@]}" wrk -t1 -c"$LOOP_CONNS" -d$((WARMUP + DURATION + 10))s --latency \
      -H "x-api-key: $API_KEY" "http://127.0.0.1:$SLUICE_PORT/loop" >"$out" 2>&1 </dev/null &
    bg=$!; remember_pid "$bg"
    sleep 1
    measure_redo plain-beside-loop "$SLUICE_PORT" "$run" "$PID_sluice" /plain 1
    stop_started "$bg"
  done
  curl -s -m 3 "http://127.0.0.1:$SLUICE_ADMIN_PORT/metrics" >"$RUN_DIR/sluice/loop.metrics" || true
  stop_all_started
  report_loop >"$RUN_DIR/results-loop.md"
}

report_loop() {
  local n deadlines loops
  deadlines=$(awk '/^sluice_plugin_failures_total/ && /plugin="chaos"/ && /reason="deadline"/ {print $NF}' "$RUN_DIR/sluice/loop.metrics" 2>/dev/null)
  loops=$(awk '/^sluice_requests_total/ && /route="loop"/ {n+=$NF} END{print n+0}' "$RUN_DIR/sluice/loop.metrics" 2>/dev/null)
  cat <<EOF
## A looping policy on another route: $RUNS rounds of ${DURATION} s, wrk -c$CONNS on /plain

/loop runs tests/guests/chaos in mode \`loop\` (deadline_ms = $LOOP_DEADLINE_MS, fuel = 10^12, on_error = deny)
under $LOOP_CONNS connections of background load; /plain has no policies. Same gateway process, one worker.

| /plain | req/s | req/s range | p50 ms | p99 ms | gateway CPU us/req | non-2xx + errors | proxy core % | req/s x alone | p50 x alone | p99 x alone |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
EOF
  for n in plain-alone plain-beside-loop; do
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$n" \
      "$(fmt "$(col "$n" 4)" %.0f)" "$(range "$n" 4)" "$(fmt "$(col "$n" 5)" %.3f)" "$(fmt "$(col "$n" 6)" %.3f)" \
      "$(fmt "$(col "$n" 10)" %.1f)" "$(fmt "$(col "$n" 7)" %.0f)" "$(fmt "$(col "$n" 9)" %.0f)" \
      "$(fmt "$(vs "$n" 4 plain-alone)" %.2f)" "$(fmt "$(vs "$n" 5 plain-alone)" %.2f)" "$(fmt "$(vs "$n" 6 plain-alone)" %.2f)"
  done
  cat <<EOF

/loop over the whole run: ${loops:-?} requests answered, ${deadlines:-?} calls stopped at their deadline
(sluice_plugin_failures_total{plugin="chaos",reason="deadline"}). "gateway CPU us/req" beside the
loop includes the looping guest's CPU. Background wrk output: \`wrk-loop-background-run*.txt\`.
EOF
}

# ---------------------------------------------------------------- scenario: overload
scenario_overload() {
  local capacity rate free delay_ms before_rss after_rss after_hwm ok i round pid_slow c0 c1 t0 t1
  SCENARIO=overload
  write_overload_configs; write_nginx_configs
  port_listening "$SLOW_PORT" && die "port $SLOW_PORT already in use"
  command -v python3 >/dev/null || die "python3 is needed for the overload scenario"
  pin_cmd "$UPSTREAM_CPU"
  "${PIN_CMD[@]}" python3 "$RUN_DIR/slow/slow.py" "$SLOW_PORT" "$SLOW_DELAY_MS" "$SLOW_LIMIT" \
    >"$RUN_DIR/slow/stdout.log" 2>&1 </dev/null &
  pid_slow=$!; remember_pid "$pid_slow"
  wait_port "$SLOW_PORT" "$pid_slow" || die "slow upstream did not start (see $RUN_DIR/slow/stdout.log)"
  # The harness's own floor: nginx answering at once, on the proxy core, under the same load.
  port_listening "$UPSTREAM_PORT" && die "port $UPSTREAM_PORT already in use"
  start_nginx upstream "$PROXY_CPU"
  wait_port "$UPSTREAM_PORT" "$PID_upstream" || die "nginx did not start (see $RUN_DIR/upstream/error.log)"
  start_sluice overload

  capacity=$(( SLOW_LIMIT * 1000 / SLOW_DELAY_MS ))
  rate=$(( capacity * OVERLOAD_FACTOR ))
  # Connections held by the route (in flight or queued) send nothing; the others each send one
  # request per pause, since a shed answer takes well under a millisecond.
  free=$(( OVERLOAD_CONNS - SLOW_LIMIT - OVERLOAD_QUEUED ))
  ((free > 0)) || die "OVERLOAD_CONNS must be above SLOW_LIMIT + OVERLOAD_QUEUED"
  delay_ms=$(( free * 1000 / rate )); ((delay_ms > 0)) || delay_ms=1
  for i in 1 2 3; do curl -s -m 3 -o /dev/null "http://127.0.0.1:$SLUICE_PORT/" || true; done
  before_rss=$(status_kib VmRSS "$PID_sluice")
  log "overload: capacity $capacity req/s (${SLOW_LIMIT} at once x ${SLOW_DELAY_MS} ms), offering ~$rate req/s, $OVERLOAD_ROUNDS rounds of ${OVERLOAD_DURATION}s ($OVERLOAD_CONNS connections, ${delay_ms} ms between requests)"

  export BENCH_DELAY_MS=$delay_ms # read by record.lua, as is BENCH_LAT_DIR
  : >"$RUN_DIR/overload-rounds.tsv"
  for round in $(seq 1 "$OVERLOAD_ROUNDS"); do
    log "overload round $round/$OVERLOAD_ROUNDS: sluice"
    mkdir -p "$RUN_DIR/overload/sluice-$round" "$RUN_DIR/overload/floor-$round"
    c0=$(cpu_ticks "$PID_sluice"); t0=$(date +%s.%N)
    BENCH_LAT_DIR=$RUN_DIR/overload/sluice-$round THREADS=$OVERLOAD_CONNS run_wrk "$RUN_DIR/wrk-overload-$round.txt" \
      "$OVERLOAD_CONNS" "$OVERLOAD_DURATION" "http://127.0.0.1:$SLUICE_PORT/" -s "$RUN_DIR/slow/record.lua"
    t1=$(date +%s.%N); c1=$(cpu_ticks "$PID_sluice")
    log "overload round $round/$OVERLOAD_ROUNDS: the harness's floor (nginx answering at once)"
    BENCH_LAT_DIR=$RUN_DIR/overload/floor-$round THREADS=$OVERLOAD_CONNS run_wrk "$RUN_DIR/wrk-overload-floor-$round.txt" \
      "$OVERLOAD_CONNS" "$OVERLOAD_DURATION" "http://127.0.0.1:$UPSTREAM_PORT/" -s "$RUN_DIR/slow/record.lua"
    overload_round "$round" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" $((c1 - c0)) >>"$RUN_DIR/overload-rounds.tsv"
  done
  after_rss=$(status_kib VmRSS "$PID_sluice"); after_hwm=$(status_kib VmHWM "$PID_sluice")

  sleep 1
  : >"$RUN_DIR/overload-after.txt"
  for i in $(seq 1 20); do
    curl -s -m 5 -o /dev/null -w '%{http_code} %{time_total}\n' -H "x-api-key: $API_KEY" "http://127.0.0.1:$SLUICE_PORT/" \
      >>"$RUN_DIR/overload-after.txt" || echo "000 0" >>"$RUN_DIR/overload-after.txt"
  done
  ok=$(awk '$1==200' "$RUN_DIR/overload-after.txt" | wc -l)
  curl -s -m 3 "http://127.0.0.1:$SLUICE_ADMIN_PORT/metrics" >"$RUN_DIR/sluice/overload.metrics" || true
  stop_all_started
  report_overload "$capacity" "$delay_ms" "$before_rss" "$after_rss" "$after_hwm" "$ok" >"$RUN_DIR/results-overload.md"
}

pctl() { # file-of-numbers percentile(0-100) -> value
  sort -g "$1" | awk -v p="$2" '{a[NR]=$1} END{ if (!NR) {print "NaN"; exit} i=int(NR*p/100+0.999999); if(i<1)i=1; if(i>NR)i=NR; print a[i]}'
}

# overload_round ROUND ELAPSED SLUICE_TICKS -> one TSV row: round offered/s ok/s shed reasons
# shed p50 p99 p99.9 max, floor p50 p99 p99.9 max, 200 p50 p99 (ms), Sluice CPU %
overload_round() {
  local round=$1 elapsed=$2 ticks=$3 d=$RUN_DIR/overload f shed ok_lat floor total reasons p
  f=$d/sluice-$round.txt; shed=$d/shed-$round.ms; ok_lat=$d/ok-$round.ms; floor=$d/floor-$round.ms
  cat "$d/sluice-$round"/lat-*.txt >"$f" 2>/dev/null || : >"$f"
  cat "$d/floor-$round"/lat-*.txt 2>/dev/null | awk '{print $2/1000}' >"$floor"
  awk '$1==503 {print $2/1000}' "$f" >"$shed"
  awk '$1==200 {print $2/1000}' "$f" >"$ok_lat"
  total=$(wc -l <"$f")
  reasons=$(awk '$1!=200 {c[$1" "$3]++} END{for (k in c) printf "%s: %d, ", k, c[k]}' "$f" | sed 's/, $//')
  printf '%s\t%s\t%s\t%s\t%s' "$round" "$(awk -v n="$total" -v e="$elapsed" 'BEGIN{printf "%.0f", n/e}')" \
    "$(awk -v n="$(wc -l <"$ok_lat")" -v e="$elapsed" 'BEGIN{printf "%.0f", n/e}')" "$(wc -l <"$shed")" "${reasons:-none}"
  for p in 50 99 99.9 100; do printf '\t%s' "$(pctl "$shed" "$p")"; done
  for p in 50 99 99.9 100; do printf '\t%s' "$(pctl "$floor" "$p")"; done
  for p in 50 99; do printf '\t%s' "$(pctl "$ok_lat" "$p")"; done
  printf '\t%s\n' "$(awk -v d="$ticks" -v hz="$CLK_TCK" -v e="$elapsed" 'BEGIN{printf "%.0f", 100*d/hz/e}')"
}

report_overload() {
  local capacity=$1 delay_ms=$2 before=$3 after=$4 hwm=$5 ok=$6 rows=$RUN_DIR/overload-rounds.tsv
  med() { cut -f"$1" "$rows" | median; }
  cat <<EOF
## Overload: a slow upstream offered ${OVERLOAD_FACTOR}x its capacity, $OVERLOAD_ROUNDS rounds of ${OVERLOAD_DURATION} s

The upstream (python3 asyncio) answers after ${SLOW_DELAY_MS} ms, ${SLOW_LIMIT} at once: capacity $capacity req/s.
The route has max_in_flight = $SLOW_LIMIT, max_queued = $OVERLOAD_QUEUED, queue_timeout_ms = 1000.
wrk: $OVERLOAD_CONNS connections (one per thread), ${delay_ms} ms pause after each answer; a Lua
script records every answer's status and latency (from the request being written to the answer
parsed). Each round is followed by the same load on nginx answering at once from the proxy core:
the floor of what this harness can measure on this machine at that moment.

| round | offered req/s | 200/s | shed (503) | non-200 by reason | shed p50 ms | shed p99 ms | shed p99.9 ms | shed max ms | floor p50 ms | floor p99 ms | floor p99.9 ms | floor max ms | 200 p50 ms | 200 p99 ms | Sluice CPU % |
|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
EOF
  awk -F'\t' '{printf "| %s | %s | %s | %s | %s", $1, $2, $3, $4, $5;
    for (i = 6; i <= 13; i++) printf " | %.3f", $i; printf " | %.1f | %.1f | %s |\n", $14, $15, $16}' "$rows"
  printf '| median | %s | %s | %s | | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.1f | %.1f | %s |\n' \
    "$(med 2)" "$(med 3)" "$(med 4)" "$(med 6)" "$(med 7)" "$(med 8)" "$(med 9)" \
    "$(med 10)" "$(med 11)" "$(med 12)" "$(med 13)" "$(med 14)" "$(med 15)" "$(med 16)"
  cat <<EOF

- Sluice RSS before the first round / after the last: $(mib "$before") / $(mib "$after") MiB (peak since start $(mib "$hwm") MiB)
- normal requests 1 s after the load: $ok of 20 answered 200

Raw: \`overload/\` (per answer: status, latency in us, reason), \`overload-rounds.tsv\`,
\`overload-after.txt\`, \`sluice/overload.metrics\`.
EOF
}

# ---------------------------------------------------------------- scenario: profile
# Where the gateway spends its CPU per request, under the main scenario's load. Two views:
# perf samples with the cpu-clock software event (it works where hardware counters do not, as
# in most VMs), user and kernel together; and callgrind, which counts user-space instructions
# exactly, call graph included, for the requests served while instrumentation is on.
scenario_profile() {
  local cfg=${PROFILE_CONFIG:-plain} url before after total wrk_pid
  SCENARIO=profile
  write_nginx_configs; write_sluice_main_configs
  start_upstream
  url="http://127.0.0.1:$SLUICE_PORT$URL_PATH"
  : >"$RUN_DIR/results-profile.md"
  {
    echo "## Profile: Sluice, config \`$cfg\`, wrk -c$CONNS, GET $URL_PATH"
    echo
  } >>"$RUN_DIR/results-profile.md"

  if command -v perf >/dev/null && perf record -q -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then
    start_sluice "$cfg"
    run_wrk /dev/null "$CONNS" "$WARMUP" "$url"
    pin_cmd "$LOADGEN_CPU"
    timeout $((DURATION + 20)) "${PIN_CMD[@]}" wrk -t"$THREADS" -c"$CONNS" -d$((DURATION + 2))s -H "x-api-key: $API_KEY" "$url" \
      >"$RUN_DIR/wrk-profile-perf.txt" 2>&1 </dev/null &
    wrk_pid=$!; remember_pid "$wrk_pid"
    sleep 1
    perf record -q -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$PID_sluice" -o "$RUN_DIR/perf.data" \
      -- sleep "$DURATION" >"$RUN_DIR/perf-record.log" 2>&1 || log "perf record failed (see perf-record.log)"
    wait "$wrk_pid" 2>/dev/null || true
    stop_started "$wrk_pid"
    stop_sluice
    perf report -i "$RUN_DIR/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
      | grep -v '^#' | grep -v '^$' >"$RUN_DIR/perf-dso.txt" || true
    perf report -i "$RUN_DIR/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null \
      | grep -v '^#' | grep -v '^$' >"$RUN_DIR/perf-self.txt" || true
    perf report -i "$RUN_DIR/perf.data" --children --sort sym --stdio -g none 2>/dev/null \
      | grep -v '^#' | grep -v '^$' >"$RUN_DIR/perf-children.txt" || true
    {
      echo "### perf (cpu-clock samples, user and kernel), share of Sluice's CPU by binary"
      echo
      echo '```'
      head -8 "$RUN_DIR/perf-dso.txt"
      echo '```'
      echo
      echo "Top functions by own time (\`perf-self.txt\`; inclusive: \`perf-children.txt\`):"
      echo
      echo '```'
      head -25 "$RUN_DIR/perf-self.txt" | cut -c1-150
      echo '```'
      echo
    } >>"$RUN_DIR/results-profile.md"
  else
    log "perf cannot sample here: skipping the perf profile"
  fi

  if command -v valgrind >/dev/null && command -v callgrind_control >/dev/null; then
    pin_cmd "$PROXY_CPU"
    "${PIN_CMD[@]}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$RUN_DIR/callgrind.out" \
      "$SLUICE_BIN" run --config "$RUN_DIR/sluice/$cfg.toml" --workers 1 >"$RUN_DIR/sluice/callgrind.log" 2>&1 </dev/null &
    PID_sluice=$!; remember_pid "$PID_sluice"
    wait_port "$SLUICE_PORT" "$PID_sluice" 300 || die "sluice under valgrind did not start (see $RUN_DIR/sluice/callgrind.log)"
    run_wrk /dev/null "$CONNS" 3 "$url"
    before=$(sluice_requests)
    callgrind_control -i on "$PID_sluice" >/dev/null
    run_wrk "$RUN_DIR/wrk-profile-callgrind.txt" "$CONNS" "$DURATION" "$url"
    callgrind_control -i off "$PID_sluice" >/dev/null
    after=$(sluice_requests)
    callgrind_control -d "$PID_sluice" >/dev/null
    stop_sluice
    callgrind_annotate --inclusive=yes "$RUN_DIR"/callgrind.out.1 2>/dev/null >"$RUN_DIR/callgrind-inclusive.txt" || true
    callgrind_annotate "$RUN_DIR"/callgrind.out.1 2>/dev/null >"$RUN_DIR/callgrind-self.txt" || true
    total=$(awk '/PROGRAM TOTALS/ {gsub(/,/, "", $1); print $1; exit}' "$RUN_DIR/callgrind-inclusive.txt")
    {
      echo "### callgrind (user-space instructions, exact)"
      echo
      echo "$((after - before)) requests while instrumented; $(awk -v t="${total:-0}" -v n=$((after - before)) \
        'BEGIN{ if (n > 0) printf "%.0f", t/n; else print "n/a"}') instructions per request in user space."
      echo "Inclusive, top 45 (\`callgrind-inclusive.txt\`; by own cost: \`callgrind-self.txt\`):"
      echo
      echo '```'
      awk '/^-+$/ {n++} n>=5 && /\(/' "$RUN_DIR/callgrind-inclusive.txt" | head -45 \
        | sed -E 's/ \[[^]]*\]$//; s/\?\?\?://' | cut -c1-160
      echo '```'
    } >>"$RUN_DIR/results-profile.md"
  else
    log "valgrind is not installed: skipping the callgrind profile (apt-get install -y valgrind)"
  fi
  stop_all_started
}

sluice_requests() { # requests the gateway has answered, from its metrics
  curl -s -m 10 "http://127.0.0.1:$SLUICE_ADMIN_PORT/metrics" | awk '/^sluice_requests_total/ {n += $NF} END {print n + 0}'
}

# ---------------------------------------------------------------- main
SCENARIO_ARG=${1:-main}
case $SCENARIO_ARG in
  help|-h|--help) awk 'NR>1 && !/^#/{exit} NR>1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  stop) stop_leftovers; exit 0 ;;
  main|loop|overload|profile|all) if (($#)); then shift; fi ;;
  upstream|direct|nginx|sluice|sluice-policies) SCENARIO_ARG=main ;;
  *) die "unknown scenario '$SCENARIO_ARG' (main|loop|overload|profile|all|stop|help)" ;;
esac

ensure_tools "$([[ $SCENARIO_ARG == overload || $SCENARIO_ARG == all ]] && echo 1 || echo 0)"
build_sluice
SOURCE_STATE=$(source_state)
if (( $(nproc) < 2 )) && [[ $PIN == 1 ]]; then log "fewer than 2 CPUs: no pinning"; PIN=0; fi

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
RUN_DIR="$PERF_DIR/run/$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$RUN_DIR"
[[ -s $ACTIVE_PIDS ]] && log "note: $ACTIVE_PIDS lists PIDs of an earlier run; '$0 stop' stops any still running"
: >"$ACTIVE_PIDS"
trap cleanup EXIT
trap 'exit 130' INT TERM
# With CONFIG_SCHED_AUTOGROUP, CPU is first shared fairly between sessions, so a plain nice value
# cannot beat a compile in another terminal: also raise this session's autogroup (restored at exit).
if [[ $NICE != 0 && -w /proc/$$/autogroup && $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null) == 1 ]]; then
  AG_OLD=$(awk '{print $NF}' /proc/$$/autogroup)
  if echo "$NICE" >/proc/$$/autogroup 2>/dev/null; then log "session autogroup nice $AG_OLD -> $NICE (restored at exit)"; else AG_OLD=""; fi
fi
log "run folder: $RUN_DIR"
# Run from copies, so a build elsewhere in the workspace cannot swap the binary mid-run.
mkdir -p "$RUN_DIR/bin"
cp "$SLUICE_BIN" "$RUN_DIR/bin/sluice"; SLUICE_BIN=$RUN_DIR/bin/sluice
for p in auth transform throttle chaos; do cp "$PLUGIN_DIR/$p.wasm" "$RUN_DIR/bin/"; done
PLUGIN_DIR=$RUN_DIR/bin

case $SCENARIO_ARG in
  main) scenario_main "$@" ;;
  loop) scenario_loop ;;
  overload) scenario_overload ;;
  profile) scenario_profile ;;
  all) scenario_main; scenario_loop; scenario_overload; scenario_profile ;;
esac

{
  echo "# Sluice bench: $SCENARIO_ARG"
  echo
  machine_header
  for part in main loop overload profile; do
    [[ -f $RUN_DIR/results-$part.md ]] && { echo; cat "$RUN_DIR/results-$part.md"; }
  done
  if cat "$RUN_DIR"/raw-*.tsv 2>/dev/null | awk -F'\t' '$12+0 > 10 {bad=1} END{exit !bad}'; then
    echo
    echo "WARNING: other processes took more than 10% of the target's core during some runs (raw column 12): rerun on an idle machine, or with NICE=-15 WAIT_IDLE=60."
  fi
} >"$RUN_DIR/results.md"
cat "$RUN_DIR/results.md"
log "results: $RUN_DIR/results.md"
