package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/link"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server/notify"
	"github.com/fieldpatch/fieldpatch/internal/testenv"
)

// Starting a rollout notifies, over MQTT, the devices its first phase lets
// in, within a second or two: mosquitto_sub with a device's provisioning
// bundle receives it; a device outside the rollout's target receives
// nothing.
func TestRolloutNotifiesOverMQTT(t *testing.T) {
	sub := testenv.Command(t, "mosquitto_sub")
	dir := t.TempDir()
	key := filepath.Join(dir, "release")
	mustFP(t, "key", "gen", "--out", key)
	url, data := serveInProcess(t, "--image-key", key+".pub.pem", "--rollout-tick", "1s")
	addr, _ := mqttAddrs.Load(data)
	host, port, _ := strings.Cut(addr.(string), ":")
	srv := []string{"--server", url, "--data-dir", data}
	payload := filepath.Join(dir, "payload.bin")
	os.WriteFile(payload, bytes.Repeat([]byte("lock firmware "), 500), 0o644)
	img := filepath.Join(dir, "v2.img")
	mustFP(t, "image", "build", "--payload", payload, "--version", "2.0.0", "--security-counter", "2", "--hw-class", "lock", "--key", key+".pem", "-o", img)
	mustFP(t, append([]string{"release", "upload", "--id", "lock-2.0.0", img}, srv...)...)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	outs := map[string]*bytes.Buffer{}
	done := map[string]chan error{}
	for _, id := range []string{"lock-in", "lock-out"} {
		b := filepath.Join(dir, id)
		mustFP(t, append([]string{"device", "provision", id, "--out", b}, srv...)...)
		l, err := link.Open(b)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.CheckIn(ctx, proto.CheckIn{Version: "1.0.0", Slot: "a", HWClass: "lock"}); err != nil {
			t.Fatalf("%s check-in: %v", id, err)
		}
		cmd := exec.CommandContext(ctx, sub, "-h", host, "-p", port, "--cafile", filepath.Join(b, "ca.pem"), "--cert", filepath.Join(b, "device.pem"),
			"--key", filepath.Join(b, "device.key.pem"), "-i", id, "-t", notify.NotifyTopic(id), "-q", "1", "-C", "1", "-W", "12", "-v")
		outs[id] = &bytes.Buffer{}
		cmd.Stdout, cmd.Stderr = outs[id], outs[id]
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		done[id] = exited
		go func() { exited <- cmd.Wait() }()
	}
	time.Sleep(time.Second) // both subscribed
	start := time.Now()
	mustFP(t, append([]string{"rollout", "create", "lock-2.0.0", "--id", "now", "--device", "lock-in", "--start"}, srv...)...)
	select {
	case err := <-done["lock-in"]:
		took := time.Since(start)
		line := strings.TrimSpace(outs["lock-in"].String())
		topic, body, _ := strings.Cut(line, " ")
		var n notify.Notice
		if err != nil || topic != notify.NotifyTopic("lock-in") || json.Unmarshal([]byte(body), &n) != nil || n.Kind != "update" {
			t.Fatalf("lock-in's subscription: %v %q", err, line)
		}
		t.Logf("notified %v after the rollout started", took)
		if took > 5*time.Second {
			t.Errorf("notified %v after the rollout started, want within seconds", took)
		}
	case <-ctx.Done():
		t.Fatalf("lock-in was not notified: %s", outs["lock-in"].String())
	}
	if err := <-done["lock-out"]; err == nil || strings.Contains(outs["lock-out"].String(), "update") {
		t.Fatalf("lock-out, outside the target, heard: %v %q", err, outs["lock-out"].String())
	}
}
