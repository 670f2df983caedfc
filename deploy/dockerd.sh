#!/usr/bin/env bash
# Start or stop a Docker daemon for building the image and running the container tests
# on a machine without one running (CI, a developer's box). docs/deployment.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/dockerd.sh start [--timeout SECONDS] [--log FILE]
       deploy/dockerd.sh stop
       deploy/dockerd.sh status

start   If a Docker daemon already answers, do nothing. Otherwise (as root) start
        Debian's dockerd (apt-get install docker.io) in the background, remember its
        pid in /run/oao-dockerd.pid and wait until it answers (default 60 s).
        Exit 0 when a daemon answers, 1 when none could be started.
stop    Stop the dockerd this script started (and only that one); exit 0.
status  Exit 0 if a Docker daemon answers, 1 otherwise.
EOF
}

pidfile=/run/oao-dockerd.pid
cmd="${1:-}"
[ $# -gt 0 ] && shift
timeout=60
log=/var/log/oao-dockerd.log
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout="$2"; shift 2 ;;
    --log) log="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "dockerd.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

answers() { docker info >/dev/null 2>&1; }

case "$cmd" in
  start)
    if answers; then echo "dockerd.sh: a Docker daemon already answers"; exit 0; fi
    if [ "$(id -u)" != 0 ]; then echo "dockerd.sh: not root: cannot start dockerd" >&2; exit 1; fi
    if ! command -v dockerd >/dev/null 2>&1; then
      echo "dockerd.sh: dockerd is not installed (apt-get install docker.io)" >&2
      exit 1
    fi
    if ! command -v docker >/dev/null 2>&1; then
      echo "dockerd.sh: the docker client is not installed (apt-get install docker.io)" >&2
      exit 1
    fi
    nohup dockerd >"$log" 2>&1 &
    echo $! >"$pidfile"
    deadline=$((SECONDS + timeout))
    until answers; do
      if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "dockerd.sh: dockerd exited; the end of $log:" >&2
        tail -5 "$log" >&2
        rm -f "$pidfile"
        exit 1
      fi
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "dockerd.sh: dockerd did not answer within ${timeout} s (log: $log)" >&2
        exit 1
      fi
      sleep 0.5
    done
    echo "dockerd.sh: dockerd $(cat "$pidfile") answers (log: $log)"
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid="$(cat "$pidfile")"
      if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
          echo "dockerd.sh: dockerd $pid still running after 30 s" >&2
        fi
      fi
      rm -f "$pidfile"
      echo "dockerd.sh: stopped the dockerd it started"
    else
      echo "dockerd.sh: no dockerd started by this script"
    fi
    ;;
  status) answers ;;
  -h | --help | "") usage; [ -n "$cmd" ] ;;
  *) echo "dockerd.sh: unknown command $cmd (see --help)" >&2; exit 2 ;;
esac
