// Package proto holds the device API's wire types, shared by the update
// server and the agent. It depends on the standard library only.
//
// Version 1 of the device API (docs/PROTOCOL.md) is JSON over HTTPS with
// mutual TLS: the device is who its client certificate says.
//
//	POST /api/v1/checkin   CheckIn -> CheckInResponse (an Offer, or when to poll next)
//	GET  /api/v1/blobs/ID  the image, with Range and ETag
//	POST /api/v1/reports   Report -> ReportAck, only once the report is stored
//
// An Offer is shaped like a TUF target (name, length, hashes, custom
// fields), so that signed targets metadata can vouch for it later without a
// change of protocol.
package proto

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// Version is the device API's version, part of every path.
const Version = 1

// Paths of the device API.
const (
	PathCheckIn = "/api/v1/checkin"
	PathBlobs   = "/api/v1/blobs/" // followed by the blob's SHA-256 in hex
	PathReports = "/api/v1/reports"
	PathEnroll  = "/api/v1/enroll" // no client certificate: how a device gets one
	PathRenew   = "/api/v1/renew"  // with the current certificate: a new one for a new key
	PathTUF     = "/api/v1/tuf/"   // followed by N.root.json, timestamp.json, N.snapshot.json, N.targets.json
)

// BundlePSKFile is the provisioning bundle's file holding the device's
// pre-shared key for CoAP over DTLS (mode 0600).
const BundlePSKFile = "psk.txt"

// Limits on what a device may send.
const (
	MaxBodyBytes    = 64 << 10
	MaxAttributes   = 32
	MaxAttrLen      = 128
	MaxLogTailBytes = 8 << 10
	MaxReasonBytes  = 1 << 10
	MaxCounter      = 1 << 53 // health counters (exact in JSON numbers and in the database)
)

// CheckIn is what a device says about itself when it asks for work.
type CheckIn struct {
	Version         string            `json:"version"`          // running firmware version
	Slot            string            `json:"slot"`             // slot it runs from
	HWClass         string            `json:"hw_class"`         // hardware class
	SecurityCounter uint32            `json:"security_counter"` // non-volatile anti-rollback counter
	KeyEpoch        uint32            `json:"key_epoch"`
	TimeZone        string            `json:"time_zone,omitempty"` // IANA name, for maintenance windows
	Attributes      map[string]string `json:"attributes,omitempty"`
	// Phase and UpdateID say what the agent is doing, if anything.
	Phase    string `json:"phase,omitempty"`
	UpdateID string `json:"update_id,omitempty"`
	// Health carries the device's own counters, for the rollouts' soak gate.
	Health *Health `json:"health,omitempty"`
}

// Health is what a device counts about itself since it was made (the
// counters only grow; one that goes down starts a new baseline).
type Health struct {
	WatchdogResets uint64 `json:"watchdog_resets"`
	Crashes        uint64 `json:"crashes"`
}

// CheckInResponse is the server's answer: an offer, or when to come back.
type CheckInResponse struct {
	Offer *Offer `json:"offer,omitempty"`
	// NextPollSeconds is when to check in again (the server adds jitter).
	NextPollSeconds int `json:"next_poll_seconds"`
}

// Offer is an update for the device, shaped like a TUF target.
type Offer struct {
	UpdateID string `json:"update_id"` // one device's attempt at one release: reports name it
	Target   Target `json:"target"`
	URL      string `json:"url"` // where to download it (a path on the same server, or absolute)
}

// Target describes an image as a TUF target does.
type Target struct {
	Name   string            `json:"name"`
	Length int64             `json:"length"`
	Hashes map[string]string `json:"hashes"` // "sha256": hex
	Custom TargetCustom      `json:"custom"`
}

// TargetCustom are the target's custom fields.
type TargetCustom struct {
	Version         string `json:"version"`
	SecurityCounter uint32 `json:"security_counter"`
	HWClass         string `json:"hw_class"`
	Format          string `json:"format"` // "mcuboot"
	Downgrade       bool   `json:"downgrade,omitempty"`
	KeyEpoch        uint32 `json:"key_epoch,omitempty"`
	// ImageKeys, on the target "image-keys.json" (format "image-keys"),
	// are the image-signing keys devices trust besides their own, and the
	// key epoch at which each stops being trusted.
	ImageKeys []ImageKey `json:"image_keys,omitempty"`
}

// ImageKey is an image-signing public key (PEM) and the key epoch that
// revokes it (0: not revoked).
type ImageKey struct {
	PEM            string `json:"pem"`
	RevokedAtEpoch uint32 `json:"revoked_at_epoch,omitempty"`
}

// ImageKeysTarget is the TUF target that carries the image keys.
const ImageKeysTarget = "image-keys.json"

// Report statuses.
const (
	StatusDownloading = "downloading"
	StatusInstalling  = "installing"
	StatusRebooting   = "rebooting"
	StatusCommitted   = "committed" // success
	StatusFailed      = "failed"
	StatusRolledBack  = "rolled_back"
)

var statuses = map[string]bool{StatusDownloading: true, StatusInstalling: true, StatusRebooting: true,
	StatusCommitted: true, StatusFailed: true, StatusRolledBack: true}

// Final reports whether a status ends an update.
func Final(status string) bool {
	return status == StatusCommitted || status == StatusFailed || status == StatusRolledBack
}

// Report is a device's status report on an update. ReportID makes it
// idempotent: sending the same report again is acknowledged and stored once.
type Report struct {
	ReportID string    `json:"report_id"`
	UpdateID string    `json:"update_id"`
	Status   string    `json:"status"`
	Progress float64   `json:"progress,omitempty"` // 0 to 1, while downloading or installing
	Version  string    `json:"version,omitempty"`  // the version running when it reports
	Reason   string    `json:"reason,omitempty"`   // why it failed or rolled back
	LogTail  string    `json:"log_tail,omitempty"` // the end of the update log
	At       time.Time `json:"at,omitempty"`       // device clock; informational only
}

// ReportAck says a report is durably stored.
type ReportAck struct {
	ReportID string `json:"report_id"`
	Stored   bool   `json:"stored"`
}

// MaxMQTTCheckInBytes is the largest check-in payload the server takes
// over MQTT (a check-in is a few hundred bytes; a larger one goes over
// HTTPS, whose limit is MaxBodyBytes).
const MaxMQTTCheckInBytes = 12 << 10

// MQTTCheckIn is a check-in a device publishes on its MQTT topic
// fp/dev/ID/checkin while its session is up: the check-in's fields as
// over HTTPS, and an ID the answer carries back.
type MQTTCheckIn struct {
	RequestID string `json:"request_id"`
	CheckIn
}

// MQTTAnswer is the server's answer to an MQTT check-in, on
// fp/dev/ID/answer: the HTTP status the device API gave, its body (a
// CheckInResponse when Status is 200, an Error otherwise), and for 503
// the seconds to wait.
type MQTTAnswer struct {
	RequestID  string          `json:"request_id"`
	Status     int             `json:"status"`
	RetryAfter int             `json:"retry_after,omitempty"`
	Body       json.RawMessage `json:"body,omitempty"`
}

// EnrollRequest asks for a device certificate: with a fleet enrollment
// token it is issued at once; without one the device waits, asking again,
// until an operator approves it.
type EnrollRequest struct {
	DeviceID  string `json:"device_id"`
	PublicKey string `json:"public_key"` // PEM SubjectPublicKeyInfo of a key the device made
	Token     string `json:"token,omitempty"`
}

// EnrollResponse answers an enrollment.
type EnrollResponse struct {
	Status  string `json:"status"` // "enrolled" or "pending"
	CertPEM string `json:"cert_pem,omitempty"`
	CAPEM   string `json:"ca_pem,omitempty"`
	// TUFRoot is the repository's current root metadata, the device's
	// first trusted root (absent before the operator set one up).
	TUFRoot json.RawMessage `json:"tuf_root,omitempty"`
	// PSK is the device's pre-shared key for CoAP over DTLS (its PSK
	// identity is the device ID), issued at enrollment.
	PSK string `json:"psk,omitempty"`
}

// RenewRequest asks for a new certificate for a new key, before the
// current one expires.
type RenewRequest struct {
	PublicKey string `json:"public_key"`
}

// Error is the body of every 4xx and 5xx answer.
type Error struct {
	Error string `json:"error"`
}

var (
	idRE      = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	versionRE = regexp.MustCompile(`^[0-9A-Za-z.+-]{1,64}$`)
	classRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)
	attrKeyRE = regexp.MustCompile(`^[a-z][a-z0-9_.-]{0,63}$`)
)

// ValidID checks a device, update or report identifier: letters, digits,
// '.', '_' and '-', at most 128, not starting with a punctuation mark (so
// never "..", never a path).
func ValidID(kind, s string) error {
	if !idRE.MatchString(s) {
		return fmt.Errorf("%s %q: want 1 to 128 of [A-Za-z0-9._-], starting with a letter or digit", kind, s)
	}
	return nil
}

// ValidSHA256 checks a lowercase hex SHA-256.
func ValidSHA256(s string) error {
	if len(s) != 64 || strings.ToLower(s) != s {
		return fmt.Errorf("%q is not a lowercase hex SHA-256", s)
	}
	if _, err := hex.DecodeString(s); err != nil {
		return fmt.Errorf("%q is not a lowercase hex SHA-256", s)
	}
	return nil
}

// Validate checks a check-in from a device.
func (c *CheckIn) Validate() error {
	var errs []error
	if !versionRE.MatchString(c.Version) {
		errs = append(errs, fmt.Errorf("version %q", c.Version))
	}
	if c.Slot != "a" && c.Slot != "b" {
		errs = append(errs, fmt.Errorf("slot %q: want a or b", c.Slot))
	}
	if !classRE.MatchString(c.HWClass) {
		errs = append(errs, fmt.Errorf("hw_class %q", c.HWClass))
	}
	if c.TimeZone != "" {
		if _, err := time.LoadLocation(c.TimeZone); err != nil || strings.Contains(c.TimeZone, "..") {
			errs = append(errs, fmt.Errorf("time_zone %q is not an IANA zone", c.TimeZone))
		}
	}
	if len(c.Attributes) > MaxAttributes {
		errs = append(errs, fmt.Errorf("%d attributes: at most %d", len(c.Attributes), MaxAttributes))
	}
	for k, v := range c.Attributes {
		if !attrKeyRE.MatchString(k) || len(v) > MaxAttrLen {
			errs = append(errs, fmt.Errorf("attribute %q: names are [a-z][a-z0-9_.-]*, values at most %d bytes", k, MaxAttrLen))
		}
	}
	if c.UpdateID != "" {
		if err := ValidID("update_id", c.UpdateID); err != nil {
			errs = append(errs, err)
		}
	}
	if h := c.Health; h != nil && (h.WatchdogResets > MaxCounter || h.Crashes > MaxCounter) {
		errs = append(errs, fmt.Errorf("health counters: at most %d", uint64(MaxCounter)))
	}
	return errors.Join(errs...)
}

// Validate checks a report from a device.
func (r *Report) Validate() error {
	var errs []error
	if err := ValidID("report_id", r.ReportID); err != nil {
		errs = append(errs, err)
	}
	if err := ValidID("update_id", r.UpdateID); err != nil {
		errs = append(errs, err)
	}
	if !statuses[r.Status] {
		errs = append(errs, fmt.Errorf("status %q", r.Status))
	}
	if r.Progress < 0 || r.Progress > 1 {
		errs = append(errs, fmt.Errorf("progress %v: want 0 to 1", r.Progress))
	}
	if r.Version != "" && !versionRE.MatchString(r.Version) {
		errs = append(errs, fmt.Errorf("version %q", r.Version))
	}
	if len(r.Reason) > MaxReasonBytes {
		errs = append(errs, fmt.Errorf("reason of %d bytes: at most %d", len(r.Reason), MaxReasonBytes))
	}
	if len(r.LogTail) > MaxLogTailBytes {
		errs = append(errs, fmt.Errorf("log_tail of %d bytes: at most %d", len(r.LogTail), MaxLogTailBytes))
	}
	return errors.Join(errs...)
}
