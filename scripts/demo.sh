#!/usr/bin/env bash
# make tour: the command line, step by step, with one real device.
# Every step runs the real binaries; any unexpected result stops the demo
# with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
FP=${FP:-bin/fieldpatch}
AGENT=${AGENT:-bin/fieldpatch-agent}
work=$(mktemp -d "${TMPDIR:-/tmp}/fieldpatch-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
# flip FILE OFFSET: invert one byte in place (a bit rot, a tampering).
flip() {
	local b
	b=$(od -An -tu1 -j "$2" -N1 "$1" | tr -d ' ')
	printf "\\$(printf %03o $((255 - b)))" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
expect_refused() {
	printf '$ %s\n' "$*"
	set +e
	"$@"
	rc=$?
	set -e
	if [ "$rc" -ne 1 ]; then
		echo "demo: expected exit 1 (refused), got $rc" >&2
		exit 1
	fi
	echo "(exit 1: refused, as it must be)"
}

step "1. An operator makes an image-signing key (Ed25519; keep the .pem offline)"
run "$FP" key gen --out "$work/release-key"

step "2. Build a signed image: payload, version, anti-rollback counter, hardware class"
# The payload is a real program: the device agent binary itself.
run "$FP" image build --payload "$AGENT" --version 1.4.2 --security-counter 3 \
	--hw-class smartlock-v2 --key "$work/release-key.pem" -o "$work/smartlock-1.4.2.img"

step "3. Inspect it (nothing trusted yet: the digest is recomputed)"
run "$FP" image inspect "$work/smartlock-1.4.2.img"

step "4. Verify it against the trusted public key, as the server and the device do"
run "$FP" image verify --key "$work/release-key.pub.pem" "$work/smartlock-1.4.2.img"
run "$AGENT" verify --key "$work/release-key.pub.pem" "$work/smartlock-1.4.2.img"

step "5. A copy with one payload byte changed is refused"
cp "$work/smartlock-1.4.2.img" "$work/tampered.img"
flip "$work/tampered.img" 100000
expect_refused "$FP" image verify --key "$work/release-key.pub.pem" "$work/tampered.img"

step "6. An image signed by somebody else's key is refused"
run "$FP" key gen --out "$work/attacker-key" >/dev/null
run "$FP" image build --payload "$AGENT" --version 9.9.9 --security-counter 99 \
	--hw-class smartlock-v2 --key "$work/attacker-key.pem" -o "$work/forged.img" >/dev/null
expect_refused "$FP" image verify --key "$work/release-key.pub.pem" "$work/forged.img"

step "7. Key rotation: an image signed by the old and the new key is accepted by devices that trust either"
run "$FP" key gen --type p256 --out "$work/new-key" >/dev/null
run "$FP" image build --payload "$AGENT" --version 1.5.0 --security-counter 4 --hw-class smartlock-v2 \
	--key "$work/release-key.pem" --key "$work/new-key.pem" -o "$work/smartlock-1.5.0.img"
run "$FP" image verify --key "$work/release-key.pub.pem" "$work/smartlock-1.5.0.img"
run "$FP" image verify --key "$work/new-key.pub.pem" "$work/smartlock-1.5.0.img"

step "8. MCUboot interoperability: an image signed by MCUboot's own imgtool verifies here"
run "$FP" image verify --key internal/image/testdata/mcuboot/ed25519.pub.pem \
	internal/image/testdata/imgtool/ed25519-sc5-pad-confirm.bin

# new_device DIR: a file-backed device running 1.4.2 from slot a, with data
# and hooks that follow docs/HOOKS.md (1.5.0 in slot b migrates users.txt
# to users.csv and can revert it).
new_device() {
	local d=$1
	mkdir -p "$d/data" "$d/hooks"
	cp "$work/smartlock-1.4.2.img" "$d/slot-a.img" && truncate -s 32M "$d/slot-a.img"
	truncate -s 32M "$d/slot-b.img"
	truncate -s 32K "$d/env.img"
	printf 'env.img 0x0 0x4000\nenv.img 0x4000 0x4000\n' > "$d/fw_env.config"
	cp "$work/release-key.pub.pem" "$d/"
	printf '1\n' > "$d/data/format"
	printf 'alice\nbob\ncarol\n' > "$d/data/users.txt"
	cp -r docs/examples/hooks/v1 "$d/hooks/a"
	cp -r docs/examples/hooks/v2 "$d/hooks/b"
	cat > "$d/device.json" <<JSON
{
  "slots": {"a": "slot-a.img", "b": "slot-b.img"},
  "env": {"type": "uboot", "fw_env_config": "fw_env.config"},
  "keys": [{"path": "release-key.pub.pem"}],
  "nv": "nv.bin",
  "hw_class": "smartlock-v2",
  "state_dir": "state",
  "data_dir": "data",
  "hooks_dir": "hooks/{slot}"
}
JSON
}

step "9. A device: slots a and b, a redundant U-Boot environment, the non-volatile store, data and hooks"
dev="$work/device"
new_device "$dev"
run "$AGENT" nv --config "$dev/device.json" --init
run "$AGENT" boot --config "$dev/device.json"

step "10. The agent installs 1.5.0: verify, write slot b while hashing, re-verify, arm a trial"
run "$AGENT" install --config "$dev/device.json" "$work/smartlock-1.5.0.img" 2>/dev/null

step "11. Reboot: the selector boots slot b on trial; the new firmware migrates its data, checks its health, commits"
run "$AGENT" boot --config "$dev/device.json"
run "$AGENT" resume --config "$dev/device.json" 2>/dev/null
run "$AGENT" status --config "$dev/device.json"
printf '$ cat data/users.csv\n'; cat "$dev/data/users.csv"

step "12. A bad 1.6.0 (its health check fails) is installed into slot a, tried, and rolled back"
"$FP" image build --payload "$AGENT" --version 1.6.0 --security-counter 4 --hw-class smartlock-v2 \
	--key "$work/release-key.pem" -o "$work/smartlock-1.6.0.img" >/dev/null
rm -rf "$dev/hooks/a" && cp -r docs/examples/hooks/v2 "$dev/hooks/a"
printf '#!/bin/sh\necho "1.6.0: service does not answer" >&2\nexit 1\n' > "$dev/hooks/a/health-check"
run "$AGENT" install --config "$dev/device.json" "$work/smartlock-1.6.0.img" 2>/dev/null
run "$AGENT" boot --config "$dev/device.json"
run "$AGENT" resume --config "$dev/device.json" 2>/dev/null
run "$AGENT" boot --config "$dev/device.json"
run "$AGENT" resume --config "$dev/device.json" 2>/dev/null
run "$AGENT" status --config "$dev/device.json"

step "13. Slot b is damaged on the flash: the selector falls back to the other slot that verifies"
flip "$dev/slot-b.img" 4096
run "$AGENT" boot --config "$dev/device.json"

step "14. Both slots damaged: recovery, never a jump into unverified code"
flip "$dev/slot-a.img" 4096
expect_refused "$AGENT" boot --config "$dev/device.json"

step "15. Over the network: a real update server, a provisioned device, a rollout"
srvdata="$work/server"
mkdir -p "$srvdata/image-keys"
cp "$work/release-key.pub.pem" "$srvdata/image-keys/"
"$FP" serve --listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --data-dir "$srvdata" --poll-interval 1s > "$work/serve.out" 2> "$work/serve.log" &
srvpid=$!
trap 'kill $srvpid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do grep -q '^serving on' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^serving on //p' "$work/serve.out")
echo "fieldpatch serve: $url (TLS 1.3, a CA and an admin token created in $srvdata)"
online="$work/online-device"
new_device "$online"
run "$FP" device provision lock-7 --group lab --out "$online/bundle" --server "$url" --data-dir "$srvdata"
sed -i 's|"hooks_dir": "hooks/{slot}"|"hooks_dir": "hooks/{slot}",\n  "link": {"bundle": "bundle"}|' "$online/device.json"
run "$AGENT" nv --config "$online/device.json" --init >/dev/null
run "$AGENT" boot --config "$online/device.json" >/dev/null
run "$FP" release upload --id smartlock-1.5.0 "$work/smartlock-1.5.0.img" --server "$url" --data-dir "$srvdata"
run "$FP" rollout create smartlock-1.5.0 --id lab-1.5.0 --group lab --phases 100 --max-rollback-rate 0.1 --min-sample 1 --start --server "$url" --data-dir "$srvdata"

step "16. The agent daemon checks in, downloads over mutual TLS, installs and asks for a reboot; on trial it commits and reports"
run "$AGENT" run --config "$online/device.json" 2>/dev/null
run "$AGENT" boot --config "$online/device.json"
printf '$ %s\n' "$AGENT run --config device.json   (stopped after a few seconds)"
timeout -s TERM 4 "$AGENT" run --config "$online/device.json" 2>/dev/null || [ $? -eq 124 ]
run "$FP" device list --server "$url" --data-dir "$srvdata"
"$FP" device show lock-7 --server "$url" --data-dir "$srvdata" > "$work/lock-7.json"
grep -E '"(version|status|release_id)"' "$work/lock-7.json"
grep -q '"status": "committed"' "$work/lock-7.json" || { echo "demo: the server did not record the commit" >&2; exit 1; }
run "$FP" rollout show lab-1.5.0 --server "$url" --data-dir "$srvdata"

printf '\n\033[1mdemo complete: every step behaved as it must.\033[0m\n'
