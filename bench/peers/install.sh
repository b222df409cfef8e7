#!/usr/bin/env bash
# Installs the peers of make bench-peers into .peers/ (ignored by git): a virtualenv with the
# Python packages of bench/peers/requirements.txt, and Restate's server from npm.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS=.peers
PYTHON=${PYTHON:-python3}
STAMP=$PEERS/.installed-stamp
if [ -f "$STAMP" ] && [ "$STAMP" -nt bench/peers/requirements.txt ] && [ "$STAMP" -nt bench/peers/install.sh ]; then
	exit 0
fi
mkdir -p "$PEERS"
[ -x "$PEERS/venv/bin/python" ] || "$PYTHON" -m venv "$PEERS/venv"
"$PEERS/venv/bin/pip" install --quiet --upgrade pip
"$PEERS/venv/bin/pip" install --quiet --disable-pip-version-check -r bench/peers/requirements.txt
mkdir -p "$PEERS/node"
(cd "$PEERS/node" && [ -f package.json ] || echo '{"private": true}' > package.json)
(cd "$PEERS/node" && npm install --silent --no-audit --no-fund @restatedev/restate-server@1.7.12)
touch "$STAMP"
