package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/device/boot"
	"github.com/fieldpatch/fieldpatch/internal/device/slot"
	"github.com/fieldpatch/fieldpatch/internal/proto"
)

// healthFromFile reads the health counters the system keeps in a file. A
// missing or unreadable file means no counters this time, not an error:
// the check-in matters more.
func healthFromFile(path string) func() *proto.Health {
	return func() *proto.Health {
		b, err := os.ReadFile(path)
		if err != nil || len(b) > 4096 {
			return nil
		}
		var h proto.Health
		if json.Unmarshal(b, &h) != nil || h.WatchdogResets > proto.MaxCounter || h.Crashes > proto.MaxCounter {
			return nil
		}
		return &h
	}
}

// Config is the device agent's configuration file: the boot side
// (boot.Config: slots, environment, keys, non-volatile store, hardware
// class) and where the agent keeps its state and finds its hooks.
//
//	{
//	  "slots": {"a": "/dev/mmcblk0p2", "b": "/dev/mmcblk0p3"},
//	  "env": {"type": "uboot", "fw_env_config": "/etc/fw_env.config"},
//	  "keys": [{"path": "/etc/fieldpatch/release.pub.pem"}],
//	  "nv": "/var/lib/fieldpatch/nv",
//	  "hw_class": "smartlock-v2",
//	  "state_dir": "/var/lib/fieldpatch",
//	  "data_dir": "/var/lib/smartlock",
//	  "hooks_dir": "/etc/fieldpatch/hooks",
//	  "hook_timeout": "5m",
//	  "reboot_command": ["systemctl", "reboot"]
//	}
type Config struct {
	boot.Config
	// StateDir holds the journal, the staging file and revert material; it
	// must be on the data partition, shared by both slots' firmware.
	// Required for updates (not for boot, env and nv).
	StateDir string `json:"state_dir"`
	// DataDir is the application's data, snapshotted before migrate-data
	// when the new firmware has no revert-data hook.
	DataDir string `json:"data_dir,omitempty"`
	// HooksDir holds the running firmware's hooks. "{slot}" in it is
	// replaced by the slot that booted, so each slot's firmware can bring
	// its own (on a real device the directory is simply inside each slot's
	// root file system).
	HooksDir string `json:"hooks_dir,omitempty"`
	// HookTimeout bounds each hook, as a Go duration ("90s", "5m").
	HookTimeout string `json:"hook_timeout,omitempty"`
	// RebootCommand is run to reboot into a trial or after a rollback;
	// empty, and the agent exits asking for a reboot instead.
	RebootCommand []string `json:"reboot_command,omitempty"`
	// Link connects the agent to an update server.
	Link *LinkConfig `json:"link,omitempty"`
	// TimeZone is the device's IANA time zone ("Europe/Berlin"); rollouts
	// open their maintenance windows in it.
	TimeZone string `json:"time_zone,omitempty"`
	// Attributes are reported at every check-in; rollouts can target them
	// ("site": "berlin-3").
	Attributes map[string]string `json:"attributes,omitempty"`
	// HealthFile is a JSON file the system keeps up to date with its own
	// counters, {"watchdog_resets": N, "crashes": M}, which only grow. The
	// agent reports them at every check-in; a rollout's soak gate compares
	// their rate on the new firmware with the old.
	HealthFile string `json:"health_file,omitempty"`
}

// LinkConfig says how to reach the update server.
type LinkConfig struct {
	// Bundle is the provisioning bundle directory (fieldpatch device
	// provision writes it): server URL, device key and certificate, CA.
	// With Enroll set, the agent writes it itself on first start.
	Bundle string `json:"bundle"`
	// Enroll, when the bundle does not exist yet, enrolls the device.
	Enroll *EnrollConfig `json:"enroll,omitempty"`
	// MQTT, if set, is the server's MQTT broker (mqtts://HOST:PORT): the
	// agent listens there for notifications and checks in at once when
	// one comes, instead of at its next poll. Polling goes on as before.
	MQTT string `json:"mqtt,omitempty"`
	// CoAP, if set (coaps://HOST:PORT), carries check-ins, reports, TUF
	// metadata and image downloads over CoAP on DTLS instead of HTTPS
	// (enrollment stays on HTTPS). CoAPAuth is how the device
	// authenticates there: "cert" (its certificate, the default) or "psk"
	// (the pre-shared key of its bundle, psk.txt).
	CoAP     string `json:"coap,omitempty"`
	CoAPAuth string `json:"coap_auth,omitempty"`
}

// EnrollConfig is how a device without a bundle enrolls: it makes its own
// key and asks the server for a certificate, with a fleet token or by
// waiting for an operator's approval.
type EnrollConfig struct {
	Server    string `json:"server"`               // the server's URL
	CA        string `json:"ca"`                   // its CA certificate, shipped with the firmware
	DeviceID  string `json:"device_id"`            // e.g. the serial number
	TokenFile string `json:"token_file,omitempty"` // a fleet enrollment token; absent: wait for approval
	Poll      string `json:"poll,omitempty"`       // between attempts while pending (default 30s)
}

// LoadConfig reads and validates an agent config file.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var c Config
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	c.SetBase(filepath.Dir(path))
	if c.KeysFile == "" && c.StateDir != "" {
		c.KeysFile = filepath.Join(c.StateDir, "tuf", "image-keys.json") // what the TUF client learns
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &c, nil
}

// Validate checks the config.
func (c *Config) Validate() error {
	errs := []error{c.Config.Validate()}
	if c.Link != nil && c.Link.Bundle == "" {
		errs = append(errs, errors.New("link.bundle is required when link is given"))
	}
	if c.Link != nil && c.Link.CoAP != "" {
		if u, err := url.Parse(c.Link.CoAP); err != nil || u.Scheme != "coaps" || u.Hostname() == "" || u.Port() == "" {
			errs = append(errs, fmt.Errorf("link.coap %q: want coaps://HOST:PORT", c.Link.CoAP))
		}
	}
	if c.Link != nil && c.Link.CoAPAuth != "" && c.Link.CoAPAuth != "cert" && c.Link.CoAPAuth != "psk" {
		errs = append(errs, fmt.Errorf("link.coap_auth %q: want cert or psk", c.Link.CoAPAuth))
	}
	if c.Link != nil && c.Link.MQTT != "" {
		if u, err := url.Parse(c.Link.MQTT); err != nil || u.Scheme != "mqtts" || u.Hostname() == "" || u.Port() == "" {
			errs = append(errs, fmt.Errorf("link.mqtt %q: want mqtts://HOST:PORT", c.Link.MQTT))
		}
	}
	if c.Link != nil && c.Link.Enroll != nil {
		e := c.Link.Enroll
		if e.Server == "" || e.CA == "" || e.DeviceID == "" {
			errs = append(errs, errors.New("link.enroll needs server, ca and device_id"))
		}
		if e.Poll != "" {
			if d, err := time.ParseDuration(e.Poll); err != nil || d <= 0 {
				errs = append(errs, fmt.Errorf("link.enroll.poll %q: want a duration", e.Poll))
			}
		}
	}
	if c.TimeZone != "" {
		if _, err := time.LoadLocation(c.TimeZone); err != nil {
			errs = append(errs, fmt.Errorf("time_zone %q: %v", c.TimeZone, err))
		}
	}
	if len(c.Attributes) > proto.MaxAttributes {
		errs = append(errs, fmt.Errorf("attributes: at most %d", proto.MaxAttributes))
	}
	if c.HookTimeout != "" {
		if d, err := time.ParseDuration(c.HookTimeout); err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("hook_timeout %q: want a positive duration such as 90s or 5m", c.HookTimeout))
		}
	}
	return errors.Join(errs...)
}

// NewRunner opens the device the config describes and makes a runner.
// The returned function closes the devices.
func (c *Config) NewRunner(log *slog.Logger) (*Runner, func(), error) {
	if c.StateDir == "" {
		return nil, nil, errors.New("state_dir is required for updates: where the journal lives")
	}
	dev, closeAll, err := c.Open(false)
	if err != nil {
		return nil, nil, err
	}
	timeout := DefaultHookTimeout
	if c.HookTimeout != "" {
		timeout, _ = time.ParseDuration(c.HookTimeout)
	}
	r := &Runner{
		FS:       slot.OSFS{},
		StateDir: c.Path(c.StateDir),
		DataDir:  c.Path(c.DataDir),
		Device:   dev,
		NV:       c.NVStore(),
		Fetcher:  &HTTPFetcher{},
		OpenSource: func(path string) (io.ReadCloser, error) {
			return os.Open(path)
		},
		Log:        log,
		TimeZone:   c.TimeZone,
		KeysFile:   c.Path(c.KeysFile),
		Attributes: c.Attributes,
	}
	if c.HealthFile != "" {
		r.Health = healthFromFile(c.Path(c.HealthFile))
	}
	hooks := &ExecHooks{Timeout: timeout, Log: log}
	r.Hooks = &slotHooks{pattern: c.Path(c.HooksDir), hooks: hooks, runner: r}
	if len(c.RebootCommand) > 0 {
		cmd := c.RebootCommand
		r.Reboot = func(ctx context.Context) error {
			out, err := exec.CommandContext(ctx, cmd[0], cmd[1:]...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("reboot command %v: %v: %s", cmd, err, out)
			}
			return nil
		}
	}
	return r, closeAll, nil
}

// slotHooks resolves "{slot}" in the hooks directory to the booted slot
// each time hooks run.
type slotHooks struct {
	pattern string
	hooks   *ExecHooks
	runner  *Runner
}

func (s *slotHooks) at() *ExecHooks {
	h := *s.hooks
	h.Dir = s.pattern
	if strings.Contains(s.pattern, "{slot}") {
		booted := "a"
		if f, err := s.runner.Facts(); err == nil {
			booted = f.Booted
		}
		h.Dir = strings.ReplaceAll(s.pattern, "{slot}", booted)
	}
	return &h
}

func (s *slotHooks) Run(ctx context.Context, name string, env HookEnv) error {
	if s.pattern == "" {
		return nil
	}
	return s.at().Run(ctx, name, env)
}

func (s *slotHooks) SaveRevert(ctx context.Context, path string) (bool, error) {
	if s.pattern == "" {
		return false, nil
	}
	return s.at().SaveRevert(ctx, path)
}

func (s *slotHooks) RunSaved(ctx context.Context, path string, env HookEnv) error {
	return s.hooks.RunSaved(ctx, path, env)
}
