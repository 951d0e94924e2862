// Package grub holds fieldpatch's GRUB configuration (grub.cfg), which runs
// the A/B boot selection on the same variables as the Go selector in
// internal/device/boot, and its tests, which boot it in real GRUB (grub-emu)
// again and again on a disk image whose environment block our codec writes.
//
// Each slot on a GRUB device is a directory holding the kernel, slot.env
// (the image's security counter) and SHA256SUMS with a detached OpenPGP
// signature; GRUB verifies the signature (verify_detached), the hashes
// (hashsum --check) and the counter before it boots a slot.
// docs/BOOTLOADER.md says how to install it on a board.
package grub
