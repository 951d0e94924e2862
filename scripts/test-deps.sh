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
	u-boot-qemu      # real U-Boot (qemu_arm64) running bootloader/uboot/boot.cmd
	qemu-system-arm  # qemu-system-aarch64: the virtual board
	u-boot-tools     # mkimage (boot.scr, signed FITs), mkenvimage
	device-tree-compiler # dtc, which mkimage uses to build FITs
	fdisk            # sfdisk: the virtual board's partition table
	dosfstools       # mkfs.vfat: the boot partition
	mtools           # mcopy: boot.scr onto the FAT image without mounting
	mosquitto-clients # mosquitto_sub / mosquitto_pub / mosquitto_rr: the MQTT broker's real peers
	mosquitto        # the external MQTT broker (--mqtt-broker) the server and agents are tested against
	libcoap3-bin     # coap-client-openssl: CoAP over DTLS interoperability (PSK and certificates)
)
# make bench (scripts/test-deps.sh --bench) also needs the peers it measures against.
if [ "${1:-}" = "--bench" ]; then
	packages+=(
		nginx-light  # bench/checkin: the yardstick for check-ins and blob downloads
	)
fi

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
