#!/usr/bin/env bash
# make demo: the real end-to-end path as far as it exists today.
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
printf '\x42' | dd of="$work/tampered.img" bs=1 seek=100000 conv=notrunc status=none
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

printf '\n\033[1mdemo complete: every step behaved as it must.\033[0m\n'
