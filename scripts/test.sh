#!/usr/bin/env bash
# Runs every test of the workspace. First installs what the black-box tests drive, if missing:
# the SIP peers from Debian (sipsak, Net::SIP) and a Python venv with pjsip and Twilio's library.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v sipsak >/dev/null 2>&1 || missing+=(sipsak)
perl -MNet::SIP -e1 >/dev/null 2>&1 || missing+=(libnet-sip-perl)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! .venv/bin/python -c 'import pjsua2, twilio' >/dev/null 2>&1; then
  echo "creating .venv with tests/requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
fi

exec cargo test --workspace "$@"
