#!/bin/sh
# The kakuremichi agent's one-line install, served by control at /install.sh:
#
#   curl -fsSL https://<control>/install.sh | sh -s -- --token <enrollment token>
#
# It fetches the agent binary for this machine's architecture from control, checks its SHA-256,
# installs it, writes the token to a file only its owner reads (0600), then installs and starts a
# systemd unit where systemd runs, or else starts the agent in the background and says how to keep
# it running. Running it again updates the binary and restarts the agent; the same token keeps the
# site's identity, a new one (regenerated on control) enrolls the host again.
set -eu

CONTROL='__KAKUREMICHI_CONTROL_URL__'
TOKEN=''
SERVICE=auto
INSECURE=''
if [ "$(id -u)" = 0 ]; then
  BIN_DIR=/usr/local/bin
  DATA_DIR=/var/lib/kakuremichi-agent
else
  BIN_DIR="${HOME:-/tmp}/.local/bin"
  DATA_DIR="${HOME:-/tmp}/.local/share/kakuremichi-agent"
fi
SYSTEMD_DIR="${KAKUREMICHI_SYSTEMD_DIR:-/etc/systemd/system}"
UNIT=kakuremichi-agent.service

say() { printf 'kakuremichi: %s\n' "$*"; }
die() { printf 'kakuremichi: error: %s\n' "$*" >&2; exit 1; }
usage() {
  cat <<USAGE
usage: install.sh --token TOKEN [options] [-- agent options]
  --token TOKEN          the site's enrollment token (from control's site page)
  --control URL          control's URL [default: $CONTROL]
  --bin-dir DIR          where the binary goes [default: $BIN_DIR]
  --data-dir DIR         the agent's data folder [default: $DATA_DIR]
  --service MODE         auto (systemd when it runs, as root), systemd, or none (background)
  -h, --help             this help
Options after -- go to kakuremichi-agent as they are (e.g. -- --session-command '...').
USAGE
}

value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --token) value "$@"; TOKEN=$2; shift 2 ;;
    --token=*) TOKEN=${1#*=}; shift ;;
    --control) value "$@"; CONTROL=$2; shift 2 ;;
    --control=*) CONTROL=${1#*=}; shift ;;
    --bin-dir) value "$@"; BIN_DIR=$2; shift 2 ;;
    --bin-dir=*) BIN_DIR=${1#*=}; shift ;;
    --data-dir) value "$@"; DATA_DIR=$2; shift 2 ;;
    --data-dir=*) DATA_DIR=${1#*=}; shift ;;
    --service) value "$@"; SERVICE=$2; shift 2 ;;
    --service=*) SERVICE=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) printf 'kakuremichi: error: unknown option %s (see --help)\n' "$1" >&2; exit 2 ;;
  esac
done
# What is left goes to the agent.

case "$SERVICE" in auto|systemd|none) ;; *) die "--service must be auto, systemd or none, not $SERVICE" ;; esac
case "$CONTROL" in
  https://*) ;;
  http://*) INSECURE=--allow-insecure-control
    say "warning: control is reached over plain HTTP ($CONTROL): use https:// outside a lab" ;;
  *) die "--control must be an http(s) URL, not $CONTROL" ;;
esac
CONTROL=${CONTROL%/}

os=$(uname -s)
[ "$os" = Linux ] || die "this installer is for Linux; $os is not supported yet"
case "$(uname -m)" in
  x86_64|amd64) ARCH=x86_64 ;;
  aarch64|arm64) ARCH=aarch64 ;;
  *) die "unsupported architecture $(uname -m): control serves x86_64 and aarch64 agents" ;;
esac

if [ -z "$TOKEN" ] && [ ! -f "$DATA_DIR/state.json" ]; then
  die "--token is needed: this host is not enrolled yet (the site's page on control shows the command with its token)"
fi

fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 3 -o "$2" "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$2" "$1"
  else
    die "curl or wget is needed to download the agent"
  fi
}

mkdir -p "$BIN_DIR" "$DATA_DIR"
chmod 700 "$DATA_DIR"
BIN="$BIN_DIR/kakuremichi-agent"
TMP=$(mktemp "$BIN_DIR/.kakuremichi-agent.XXXXXX")
trap 'rm -f "$TMP" "$TMP.sha256"' EXIT INT TERM
URL="$CONTROL/download/kakuremichi-agent-linux-$ARCH"
say "downloading the agent for linux-$ARCH from $CONTROL"
fetch "$URL" "$TMP" || die "cannot download $URL"
fetch "$URL.sha256" "$TMP.sha256" || die "cannot download $URL.sha256"
want=$(cut -d' ' -f1 < "$TMP.sha256")
if command -v sha256sum >/dev/null 2>&1; then
  got=$(sha256sum "$TMP" | cut -d' ' -f1)
  [ "$got" = "$want" ] || die "the download is damaged: SHA-256 $got, control says $want"
else
  say "warning: no sha256sum here: the download is not checked"
fi
chmod 755 "$TMP"
mv -f "$TMP" "$BIN"
say "installed $BIN ($("$BIN" --version 2>/dev/null || echo kakuremichi-agent))"

if [ -n "$TOKEN" ]; then
  old=''
  [ -f "$DATA_DIR/token" ] && old=$(cat "$DATA_DIR/token")
  if [ "$old" != "$TOKEN" ] && [ -f "$DATA_DIR/state.json" ]; then
    # A new token: enroll again (the old identity is kept aside, not lost).
    mv -f "$DATA_DIR/state.json" "$DATA_DIR/state.json.replaced"
    say "a new token: this host enrolls again (the old state is in $DATA_DIR/state.json.replaced)"
  fi
  (umask 077 && printf '%s\n' "$TOKEN" > "$DATA_DIR/token.new" && mv -f "$DATA_DIR/token.new" "$DATA_DIR/token")
fi

# The agent's command line, each word quoted for sh and for systemd alike.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
ARGS="--control $(quote "$CONTROL") --data-dir $(quote "$DATA_DIR")"
[ -f "$DATA_DIR/token" ] && ARGS="$ARGS --token-file $(quote "$DATA_DIR/token")"
[ -n "$INSECURE" ] && ARGS="$ARGS $INSECURE"
for a in "$@"; do ARGS="$ARGS $(quote "$a")"; done

use_systemd=no
case "$SERVICE" in
  systemd) use_systemd=yes ;;
  auto) if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then use_systemd=yes; fi ;;
esac

if [ "$use_systemd" = yes ]; then
  command -v systemctl >/dev/null 2>&1 || die "--service systemd, but there is no systemctl here"
  mkdir -p "$SYSTEMD_DIR"
  cat > "$SYSTEMD_DIR/$UNIT.new" <<UNITFILE
[Unit]
Description=kakuremichi agent
Documentation=$CONTROL/
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$(quote "$BIN") $ARGS
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
UNITFILE
  mv -f "$SYSTEMD_DIR/$UNIT.new" "$SYSTEMD_DIR/$UNIT"
  systemctl daemon-reload
  systemctl enable "$UNIT" >/dev/null
  systemctl restart "$UNIT"
  say "started as the systemd unit $UNIT (journalctl -u $UNIT follows its log)"
  exit 0
fi

PIDFILE="$DATA_DIR/agent.pid"
if [ -f "$PIDFILE" ]; then
  pid=$(cat "$PIDFILE")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q kakuremichi-agent "/proc/$pid/cmdline" 2>/dev/null; then
    say "stopping the agent that runs (pid $pid)"
    kill "$pid" 2>/dev/null || true
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -9 "$pid" 2>/dev/null || true
  fi
fi
cd "$DATA_DIR"
eval "set -- $ARGS"
nohup "$BIN" "$@" >> "$DATA_DIR/agent.log" 2>&1 < /dev/null &
echo $! > "$PIDFILE"
say "started the agent in the background (pid $!, log $DATA_DIR/agent.log)"
say "it does not start again after a reboot by itself: run this installer as root where systemd runs,"
say "or add to root's crontab:  @reboot cd $(quote "$DATA_DIR") && $(quote "$BIN") $ARGS >> agent.log 2>&1"
