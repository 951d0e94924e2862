package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/proto"
	"github.com/fieldpatch/fieldpatch/internal/server"
	"github.com/fieldpatch/fieldpatch/internal/server/mgmtapi"
	"github.com/fieldpatch/fieldpatch/internal/server/notify"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "serve", "[--listen ADDR] [--data-dir DIR]",
		`Runs the update server on embedded defaults: a SQLite database, a blob
folder and a certificate authority, all in the data directory (created on
first start, with a CA, a server certificate and an admin token, which it
reports). HTTPS only, TLS 1.3 and HTTP/2; devices authenticate with client
certificates issued by "fieldpatch device provision", operators with the
bootstrap admin token or named API tokens with roles ("fieldpatch
api-token create"); every change is recorded in the audit log. Releases must be signed by a key in DIR/image-keys/*.pub.pem
or given with --image-key. Operations: Prometheus metrics at /metrics,
liveness at /healthz, readiness (the database answers) at /readyz; on
SIGINT or SIGTERM it stops accepting and finishes requests in flight.

An embedded MQTT broker (--mqtt-listen, on by default) lets devices hear
at once that an update may wait for them: TLS 1.3 with the same device
certificates, each device only on its own topics (fp/dev/ID/...), where
devices may also publish their progress. For larger fleets an external
broker such as Mosquitto takes its place (--mqtt-broker mqtts://HOST:PORT,
"mqtt_broker" in the file; the embedded one is then off): the server
connects to it with a client certificate it issues itself, for the name
"fieldpatch:server", which no device can have.

Constrained devices may speak CoAP over DTLS instead of HTTPS
(--coap-listen, off by default; the standard port is 5684): the same
resources at the same paths, images and metadata block-wise, devices
authenticated by certificate or by the pre-shared key issued at enrollment.

Settings come from an optional JSON file (--config: "listen", "data_dir",
"hosts", "image_keys", "poll_interval", "mqtt_listen", "coap_listen"), then FIELDPATCH_LISTEN and
FIELDPATCH_DATA_DIR, then flags, each overriding the one before.`)
	cfgFile := fs.String("config", "", "optional JSON configuration file")
	listen := fs.String("listen", "", "address to serve HTTPS on (default 127.0.0.1:8443)")
	dataDir := fs.String("data-dir", "", "data directory (default fieldpatch-data)")
	var hosts, keys cli.Strings
	fs.Var(&hosts, "host", "a name or address the server certificate covers (repeatable; default localhost, 127.0.0.1)")
	fs.Var(&keys, "image-key", "an image-signing public key releases may be signed with (repeatable)")
	poll := fs.Duration("poll-interval", 0, "devices' base check-in interval (default 1h)")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	certLife := fs.Duration("device-cert-lifetime", 0, "validity of device certificates (default 8760h); agents renew at a third left")
	tick := fs.Duration("rollout-tick", 0, "how often rollouts' gates are judged and phases advanced (default 10s)")
	mqttListen := fs.String("mqtt-listen", "", `address of the embedded MQTT broker for device notifications (default 127.0.0.1:8883; "off" for none)`)
	mqttBroker := fs.String("mqtt-broker", "", "an external MQTT broker to use instead of the embedded one: mqtts://HOST:PORT")
	coapListen := fs.String("coap-listen", "", `UDP address of the device API over CoAP on DTLS, for example 0.0.0.0:5684 (default off)`)
	maxConns := fs.Int("max-conns", 0, "connections held at once; more wait to be accepted (default 10000); with --coap-listen, the DTLS sessions held too (past it a new session is refused, unless its device holds one: that one is replaced)")
	timeScale := fs.Float64("time-scale", 1, "run rollout scheduling (soak, windows, rate limits, silence) this many times faster than real time: for fleet simulations only")
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := serverConfig(*cfgFile)
	if err != nil {
		return err
	}
	for _, o := range []struct {
		dst       *string
		env, flag string
	}{{&cfg.Listen, "FIELDPATCH_LISTEN", *listen}, {&cfg.DataDir, "FIELDPATCH_DATA_DIR", *dataDir}} {
		if v := os.Getenv(o.env); v != "" {
			*o.dst = v
		}
		if o.flag != "" {
			*o.dst = o.flag
		}
	}
	cfg.Hosts = append(cfg.Hosts, hosts...)
	cfg.ImageKeys = append(cfg.ImageKeys, keys...)
	if *poll > 0 {
		cfg.PollInterval = *poll
	}
	cfg.DeviceCertLifetime = *certLife
	if *tick != 0 {
		cfg.RolloutTick = *tick
	}
	cfg.MaxConns = *maxConns
	switch l, b := mqttAddr(*mqttListen), mqttAddr(*mqttBroker); {
	case l != "" && b != "":
		return cli.Usagef("--mqtt-listen and --mqtt-broker exclude each other: the embedded broker or an external one")
	case b != "":
		cfg.MQTTBroker, cfg.MQTTListen = b, ""
	case *mqttBroker != "": // --mqtt-broker off
		cfg.MQTTBroker = ""
		if *mqttListen != "" {
			cfg.MQTTListen = l
		}
	case *mqttListen != "":
		cfg.MQTTListen = l
		if l != "" {
			cfg.MQTTBroker = ""
		}
	}
	if *coapListen != "" {
		cfg.CoAPListen = mqttAddr(*coapListen)
	}
	if *timeScale <= 0 {
		return cli.Usagef("--time-scale must be positive")
	}
	if *timeScale != 1 {
		cfg.Clock = scaledClock(*timeScale)
	}
	if err := cfg.Validate(); err != nil {
		return cli.Usagef("%v", err)
	}
	var lg *slog.Logger
	switch *logFormat {
	case "text":
		lg = slog.New(slog.NewTextHandler(stderr, nil))
	case "json":
		lg = slog.New(slog.NewJSONHandler(stderr, nil))
	default:
		return cli.Usagef("--log-format %q: want text or json", *logFormat)
	}
	srv, err := server.New(ctx, cfg, lg)
	if err != nil {
		return cli.Failed(err)
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return cli.Failed(err)
	}
	fmt.Fprintf(stdout, "serving on https://%s\n  CA certificate  %s\n  admin token     %s\n",
		ln.Addr(), filepath.Join(cfg.DataDir, "pki", "ca.pem"), filepath.Join(cfg.DataDir, "admin.token"))
	if srv.Broker != nil {
		fmt.Fprintf(stdout, "  MQTT broker     mqtts://%s (device certificates; topics fp/dev/ID/...)\n", srv.Broker.Addr())
	}
	if srv.MQTT != nil {
		fmt.Fprintf(stdout, "  MQTT broker     %s (external; the server connects as %s)\n", cfg.MQTTBroker, notify.ServerIdentity)
	}
	if srv.CoAP != nil {
		fmt.Fprintf(stdout, "  CoAP over DTLS  coaps://%s (device certificates or pre-shared keys)\n", srv.CoAP.Addr())
	}
	if err := srv.Serve(ctx, ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return cli.Failed(err)
	}
	return nil
}

// serverConfig reads the optional configuration file over the defaults.
func serverConfig(path string) (server.Config, error) {
	cfg := server.Config{Listen: "127.0.0.1:8443", DataDir: "fieldpatch-data", PollInterval: time.Hour, MQTTListen: "127.0.0.1:8883"}
	if path == "" {
		return cfg, nil
	}
	var f struct {
		Listen       string   `json:"listen"`
		DataDir      string   `json:"data_dir"`
		Hosts        []string `json:"hosts"`
		ImageKeys    []string `json:"image_keys"`
		PollInterval string   `json:"poll_interval"`
		MQTTListen   *string  `json:"mqtt_listen"`
		MQTTBroker   string   `json:"mqtt_broker"`
		CoAPListen   string   `json:"coap_listen"`
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return cfg, cli.Failed(err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return cfg, cli.Usagef("%s: %v", path, err)
	}
	if f.Listen != "" {
		cfg.Listen = f.Listen
	}
	if f.DataDir != "" {
		cfg.DataDir = f.DataDir
	}
	cfg.Hosts, cfg.ImageKeys = f.Hosts, f.ImageKeys
	if f.MQTTListen != nil {
		cfg.MQTTListen = mqttAddr(*f.MQTTListen)
	}
	if b := mqttAddr(f.MQTTBroker); b != "" {
		if f.MQTTListen != nil && cfg.MQTTListen != "" {
			return cfg, cli.Usagef("%s: mqtt_listen and mqtt_broker exclude each other: the embedded broker or an external one", path)
		}
		cfg.MQTTBroker, cfg.MQTTListen = b, ""
	}
	cfg.CoAPListen = mqttAddr(f.CoAPListen)
	if f.PollInterval != "" {
		d, err := time.ParseDuration(f.PollInterval)
		if err != nil || d <= 0 {
			return cfg, cli.Usagef("%s: poll_interval %q: want a duration such as 1h", path, f.PollInterval)
		}
		cfg.PollInterval = d
	}
	return cfg, nil
}

// remote is a management API client.
type remote struct {
	base  string
	token string
	http  *http.Client
}

// remoteFlags adds the flags that reach a server: --server, --ca, --token-file,
// or --data-dir to take the CA and token from a local server's directory.
func remoteFlags(fs *flag.FlagSet) func() (*remote, error) {
	srvURL := fs.String("server", envOr("FIELDPATCH_SERVER", "https://127.0.0.1:8443"), "the server's URL")
	dataDir := fs.String("data-dir", os.Getenv("FIELDPATCH_DATA_DIR"), "a local server's data directory (for its CA and bootstrap admin token)")
	caFile := fs.String("ca", os.Getenv("FIELDPATCH_CA"), "the server's CA certificate (default DATA-DIR/pki/ca.pem)")
	tokenFile := fs.String("token-file", os.Getenv("FIELDPATCH_TOKEN_FILE"), "file holding the API token (default DATA-DIR/admin.token, the bootstrap admin token)")
	return func() (*remote, error) {
		if *caFile == "" && *dataDir != "" {
			*caFile = filepath.Join(*dataDir, "pki", "ca.pem")
		}
		if *tokenFile == "" && *dataDir != "" {
			*tokenFile = filepath.Join(*dataDir, "admin.token")
		}
		if *caFile == "" || *tokenFile == "" {
			return nil, cli.Usagef("give --ca and --token-file, or --data-dir of the server")
		}
		caPEM, err := os.ReadFile(*caFile)
		if err != nil {
			return nil, cli.Failed(err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, cli.Failed(fmt.Errorf("%s: no certificate", *caFile))
		}
		tok, err := os.ReadFile(*tokenFile)
		if err != nil {
			return nil, cli.Failed(err)
		}
		return &remote{base: strings.TrimRight(*srvURL, "/"), token: strings.TrimSpace(string(tok)),
			http: &http.Client{Timeout: 10 * time.Minute, Transport: &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}, ForceAttemptHTTP2: true}}}, nil
	}
}

// connect parses the flags, wants n positional arguments (usage says
// which, when they are wrong) and makes the client for the server.
func connect(fs *flag.FlagSet, conn func() (*remote, error), args []string, n int, usage string) (*remote, []string, error) {
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return nil, nil, err
	}
	if len(pos) != n {
		return nil, nil, cli.Usagef("%s", usage)
	}
	r, err := conn()
	return r, pos, err
}

// doRaw is do for a body that is not JSON to decode: it is copied to out.
func (r *remote) doRaw(ctx context.Context, method, path string, body io.Reader, out io.Writer) error {
	var raw json.RawMessage
	if err := r.do(ctx, method, path, body, &raw); err != nil {
		return err
	}
	_, err := out.Write(raw)
	return err
}

func (r *remote) do(ctx context.Context, method, path string, body io.Reader, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, r.base+path, body)
	if err != nil {
		return cli.Failed(err)
	}
	req.Header.Set("Authorization", "Bearer "+r.token)
	resp, err := r.http.Do(req)
	if err != nil {
		return cli.Failed(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode >= 300 {
		var pe proto.Error
		json.Unmarshal(b, &pe)
		if pe.Error == "" {
			pe.Error = strings.TrimSpace(string(b))
		}
		err := fmt.Errorf("%s: %s", resp.Status, pe.Error)
		if resp.StatusCode < 500 {
			return cli.Refused(err)
		}
		return cli.Failed(err)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func jsonBody(v any) io.Reader {
	b, _ := json.Marshal(v)
	return bytes.NewReader(b)
}

func runReleaseUpload(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "release upload", "--id ID [server flags] IMAGE",
		`Uploads a signed image as a release. The server checks its signature against
its image keys and reads version, hardware class and security counter from
the image's signed TLVs; a bad or unsigned image is refused and not kept.`)
	id := fs.String("id", "", "release ID, e.g. smartlock-1.5.0 (required)")
	conn := remoteFlags(fs)
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if *id == "" || len(pos) != 1 {
		return cli.Usagef("want --id ID and one image file")
	}
	r, err := conn()
	if err != nil {
		return err
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return cli.Failed(err)
	}
	defer f.Close()
	var rel store.Release
	if err := r.do(ctx, "POST", mgmtapi.PathReleases+"?id="+url.QueryEscape(*id), f, &rel); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "release %s: %s for %s, security counter %d, %d bytes, sha256 %s\n", rel.ID, rel.Version, rel.HWClass, rel.SecurityCounter, rel.Length, rel.SHA256)
	return nil
}

func runReleaseAssign(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "release assign", "RELEASE (--device ID | --group NAME) [--downgrade] [server flags]",
		`Offers a release to one device or to a group (a rollout with one phase).
Devices that already finished it (committed, failed or rolled back) are not
offered it again; "fieldpatch device retry" changes that for one device.`)
	dev := fs.String("device", "", "the device to offer it to")
	grp := fs.String("group", "", "the group to offer it to")
	down := fs.Bool("downgrade", false, "a deliberate downgrade: devices may install a lower version with an equal counter")
	id := fs.String("id", "", "assignment ID (default: generated)")
	conn := remoteFlags(fs)
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || (*dev == "") == (*grp == "") {
		return cli.Usagef("want one release and exactly one of --device and --group")
	}
	if *id == "" {
		var b [6]byte
		rand.Read(b[:])
		*id = fmt.Sprintf("assign-%x", b)
	}
	r, err := conn()
	if err != nil {
		return err
	}
	req := mgmtapi.AssignRequest{ID: *id, Release: pos[0], Device: *dev, Group: *grp, Downgrade: *down}
	if err := r.do(ctx, "POST", mgmtapi.PathAssignments, jsonBody(req), nil); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "assigned %s to %s%s (%s)\n", pos[0], *dev, *grp, *id)
	return nil
}

func runDeviceList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "device list", "[--group G] [--tag T] [--hw-class C] [--version V] [--phase P] [--json] [server flags]",
		"Lists the devices the server knows, those matching every filter given.")
	asJSON := fs.Bool("json", false, "print JSON")
	q := url.Values{}
	for _, f := range []struct{ flag, param, help string }{
		{"group", "group", "only devices in this group"},
		{"tag", "tag", "only devices with this tag"},
		{"hw-class", "hw_class", "only this hardware class"},
		{"version", "version", "only devices running this version"},
		{"phase", "phase", "only devices in this agent phase (e.g. idle, trial)"},
	} {
		fs.Func(f.flag, f.help, func(v string) error { q.Set(f.param, v); return nil })
	}
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	path := mgmtapi.PathDevices
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var devs []store.Device
	if err := r.do(ctx, "GET", path, nil, &devs); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, devs)
	}
	fmt.Fprintf(stdout, "%-20s %-16s %-10s %-5s %-12s %s\n", "DEVICE", "HW CLASS", "VERSION", "SLOT", "PHASE", "LAST SEEN")
	for _, d := range devs {
		seen := "never"
		if !d.LastSeen.IsZero() {
			seen = d.LastSeen.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(stdout, "%-20s %-16s %-10s %-5s %-12s %s\n", d.ID, d.HWClass, d.Version, d.Slot, d.Phase, seen)
	}
	return nil
}

func runDeviceShow(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "device show", "ID [server flags]", "Shows a device and its update attempts (JSON).")
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 1, "want one device ID")
	if err != nil {
		return err
	}
	var v mgmtapi.DeviceView
	if err := r.do(ctx, "GET", mgmtapi.PathDevices+"/"+url.PathEscape(pos[0]), nil, &v); err != nil {
		return err
	}
	return cli.WriteJSON(stdout, v)
}

func runDeviceRetry(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "device retry", "ID RELEASE [server flags]",
		"Lets a device be offered a release again after it failed or rolled it back.")
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 2, "want a device ID and a release")
	if err != nil {
		return err
	}
	return r.do(ctx, "POST", mgmtapi.PathDevices+"/"+url.PathEscape(pos[0])+"/retry", jsonBody(map[string]string{"release": pos[1]}), nil)
}

func runEnrollToken(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "enroll-token create", "[--group G] [--ttl 24h] [--uses N] [server flags]",
		`Makes a fleet enrollment token: devices whose agent is configured with it
enroll on their own (make their key, get a certificate) and join the group.
The token is printed once; the server keeps only its hash.`)
	group := fs.String("group", "", "group the enrolled devices join")
	ttl := fs.Duration("ttl", 24*time.Hour, "how long the token works")
	uses := fs.Int("uses", 1, "how many devices may enroll with it")
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	var resp mgmtapi.TokenResponse
	if err := r.do(ctx, "POST", mgmtapi.PathTokens, jsonBody(mgmtapi.TokenRequest{Group: *group, TTL: ttl.String(), Uses: *uses}), &resp); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, resp)
	}
	fmt.Fprintf(stdout, "%s\n(valid until %s for %d devices)\n", resp.Token, resp.Expires.UTC().Format(time.RFC3339), resp.Uses)
	return nil
}

func runDeviceApprove(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "device approve", "ID [--group G...] [server flags]",
		`Lets in a device waiting for approval (it enrolled without a token); its
agent receives its certificate at its next enrollment attempt.`)
	var groups cli.Strings
	fs.Var(&groups, "group", "a group the device joins (repeatable)")
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 1, "want one device ID")
	if err != nil {
		return err
	}
	if err := r.do(ctx, "POST", mgmtapi.PathDevices+"/"+url.PathEscape(pos[0])+"/approve", jsonBody(map[string][]string{"groups": groups}), nil); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "approved %s\n", pos[0])
	return nil
}

func runDevicePending(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "device pending", "[--json] [server flags]", "Lists devices waiting for approval.")
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	var ids []string
	if err := r.do(ctx, "GET", mgmtapi.PathPending, nil, &ids); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, ids)
	}
	for _, id := range ids {
		fmt.Fprintln(stdout, id)
	}
	return nil
}

func runDeviceRevoke(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "device revoke", "ID [server flags]",
		`Revokes a device (stolen, compromised or decommissioned): from its next
request on, the server refuses it everywhere, whatever certificate it holds.`)
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 1, "want one device ID")
	if err != nil {
		return err
	}
	if err := r.do(ctx, "POST", mgmtapi.PathDevices+"/"+url.PathEscape(pos[0])+"/revoke", nil, nil); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "revoked %s\n", pos[0])
	return nil
}

// Bundle is the provisioning bundle's manifest (bundle.json); the
// certificates and the device key sit beside it.
type Bundle struct {
	Server   string `json:"server"`
	DeviceID string `json:"device_id"`
}

func runDeviceProvision(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "device provision", "ID --out DIR [--group G...] [server flags]",
		`Provisions one device: makes its key, has the server register it and issue
its client certificate, and writes the provisioning bundle to DIR:
bundle.json (server URL, device ID), device.key.pem (mode 0600), device.pem,
ca.pem, psk.txt (the pre-shared key for CoAP over DTLS, mode 0600), and
image-keys/*.pub.pem (the image keys the device must trust).
The agent's config points at the bundle ("link": {"bundle": DIR}).`)
	out := fs.String("out", "", "bundle directory to create (required)")
	var groups cli.Strings
	fs.Var(&groups, "group", "a group the device belongs to (repeatable)")
	conn := remoteFlags(fs)
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *out == "" {
		return cli.Usagef("want one device ID and --out DIR")
	}
	r, err := conn()
	if err != nil {
		return err
	}
	if _, err := os.Stat(*out); err == nil {
		return cli.Failed(fmt.Errorf("%s exists: a bundle is written once", *out))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return cli.Failed(err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(key.Public())
	req := mgmtapi.ProvisionRequest{ID: pos[0], Groups: groups, PublicKey: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}))}
	var resp mgmtapi.ProvisionResponse
	if err := r.do(ctx, "POST", mgmtapi.PathDevices, jsonBody(req), &resp); err != nil {
		return err
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	manifest, _ := json.MarshalIndent(Bundle{Server: r.base, DeviceID: resp.DeviceID}, "", "  ")
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"device.key.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600},
		{"device.pem", []byte(resp.CertPEM), 0o644},
		{"ca.pem", []byte(resp.CAPEM), 0o644},
		{proto.BundlePSKFile, []byte(resp.PSK + "\n"), 0o600},
		{"bundle.json", manifest, 0o644},
	}
	if len(resp.TUFRoot) > 0 {
		files = append(files, struct {
			name string
			data []byte
			mode os.FileMode
		}{"root.json", resp.TUFRoot, 0o644})
	}
	for i, k := range resp.ImageKeysPEM {
		files = append(files, struct {
			name string
			data []byte
			mode os.FileMode
		}{filepath.Join("image-keys", fmt.Sprintf("key-%d.pub.pem", i+1)), []byte(k), 0o644})
	}
	if err := os.MkdirAll(filepath.Join(*out, "image-keys"), 0o700); err != nil {
		return cli.Failed(err)
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(*out, f.name), f.data, f.mode); err != nil {
			return cli.Failed(err)
		}
	}
	fmt.Fprintf(stdout, "provisioned %s: bundle in %s (%d image keys)\n", resp.DeviceID, *out, len(resp.ImageKeysPEM))
	return nil
}

// scaledClock is a clock that starts now and runs scale times faster.
func scaledClock(scale float64) func() time.Time {
	start := time.Now()
	return func() time.Time {
		return start.Add(time.Duration(float64(time.Since(start)) * scale))
	}
}

// mqttAddr is the broker address a setting asks for ("off": none; also
// for --mqtt-broker).
func mqttAddr(v string) string {
	if v == "off" || v == "none" {
		return ""
	}
	return v
}
