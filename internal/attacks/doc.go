// Package attacks is the attack table of docs/SECURITY.md run for real: a
// real update server (its TUF repository, device API and blob store on a
// loopback TLS listener) and real devices (the agent's runner on
// file-backed slots, its TUF client and device link), with an attacker in
// the middle of the device's HTTP traffic who can replace, replay, stretch
// or slow down any metadata or image. Each row runs the legitimate case
// first and shows it accepted, then the attack, checks the typed error
// with errors.As, and checks that the device's slots, non-volatile
// counter, key epoch and trusted root version did not change.
//
// It is wiring (it imports both sides), so it lives outside the device and
// server trees; it has tests only.
package attacks
