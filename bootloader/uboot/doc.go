// Package uboot holds fieldpatch's U-Boot script (boot.cmd), which runs the
// A/B boot selection on the same variables as the Go selector in
// internal/device/boot, the FIT template for slot images (slot.its.in), and
// the tests that boot the script in real U-Boot under QEMU again and again,
// on a virtual disk whose A/B state our codec writes.
//
// On a U-Boot board each slot holds a FIT image whose configuration is
// signed (RSA-2048, SHA-256) with a key that U-Boot's control device tree
// requires; the signed configuration also carries the image's security
// counter. U-Boot checks signature, hashes and counter with `bootm start`
// before it picks a slot. docs/BOOTLOADER.md says how to put this on a board.
package uboot
