#!/usr/bin/env bash
# Installs what the tests need: Debian packages for the real peer tools the
# tests run against, and the Go modules. Idempotent and quiet: when
# everything is present it changes nothing and prints nothing.
set -euo pipefail

# Debian packages and what needs them.
packages=(
	openssl          # signature and key interoperability tests; the benchmark's yardstick
	libubootenv-tool # fw_printenv / fw_setenv: U-Boot environment interoperability
	grub-common      # grub-editenv: GRUB environment block interoperability
	mount            # losetup: slots on a real block device
	grub-emu         # real GRUB running bootloader/grub/grub.cfg
	e2fsprogs        # mke2fs -d and debugfs: the ext2 boot disk grub-emu reads
	gnupg            # detached signatures GRUB verifies
	util-linux       # setpriv: grub-emu without CAP_NET_ADMIN
)

missing=()
for p in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("$p")
	fi
done

if [ ${#missing[@]} -gt 0 ]; then
	sudo=""
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null || { echo "test-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
		sudo="sudo"
	fi
	echo "test-deps: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	$sudo apt-get update -qq >/dev/null
	$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f go.sum ]; then
	go mod download
fi
