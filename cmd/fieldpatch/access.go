package main

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/fieldpatch/fieldpatch/internal/cli"
	"github.com/fieldpatch/fieldpatch/internal/server/mgmtapi"
	"github.com/fieldpatch/fieldpatch/internal/server/store"
)

func runAPITokenCreate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "api-token create", "--name NAME --role ROLE [--json] [server flags]",
		`Makes a named management API token (admin only). Roles: viewer (reads
devices, pending list), operator (also uploads and assigns releases,
provisions, edits, approves and revokes devices, makes enrollment tokens),
admin (also manages API tokens and reads the audit log). The token is
printed once; the server keeps only its hash. Save it in a file (mode 0600)
and pass it with --token-file.`)
	name := fs.String("name", "", "a unique name, recorded in the audit log (required)")
	role := fs.String("role", "", "viewer, operator or admin (required)")
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	if *name == "" || store.RoleRank(*role) == 0 {
		return cli.Usagef("want --name and --role viewer, operator or admin")
	}
	r, err := conn()
	if err != nil {
		return err
	}
	var resp mgmtapi.APITokenResponse
	if err := r.do(ctx, "POST", mgmtapi.PathAPITokens, jsonBody(mgmtapi.APITokenRequest{Name: *name, Role: *role}), &resp); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, resp)
	}
	fmt.Fprintf(stdout, "%s\n(%s, role %s; shown once)\n", resp.Token, resp.Name, resp.Role)
	return nil
}

func runAPITokenList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "api-token list", "[--json] [server flags]", "Lists the API tokens (names and roles, never the secrets). Admin only.")
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	var ts []store.APIToken
	if err := r.do(ctx, "GET", mgmtapi.PathAPITokens, nil, &ts); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, ts)
	}
	fmt.Fprintf(stdout, "%-24s %-9s %-20s %s\n", "NAME", "ROLE", "CREATED", "REVOKED")
	for _, t := range ts {
		rev := "-"
		if !t.Revoked.IsZero() {
			rev = t.Revoked.Format(time.RFC3339)
		}
		fmt.Fprintf(stdout, "%-24s %-9s %-20s %s\n", t.Name, t.Role, t.Created.Format(time.RFC3339), rev)
	}
	return nil
}

func runAPITokenRevoke(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "api-token revoke", "NAME [server flags]", "Stops an API token from working, at once. Admin only.")
	conn := remoteFlags(fs)
	r, pos, err := connect(fs, conn, args, 1, "want one token name")
	if err != nil {
		return err
	}
	if err := r.do(ctx, "POST", mgmtapi.PathAPITokens+"/"+url.PathEscape(pos[0])+"/revoke", nil, nil); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "revoked %s\n", pos[0])
	return nil
}

func runAudit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "audit", "[--after SEQ] [--limit N] [--json] [server flags]",
		`Prints the audit log: every management request that would change
something, allowed or refused, with who asked, the answer and the request
(secrets hidden). Admin only.`)
	after := fs.Int64("after", 0, "only entries after this sequence number")
	limit := fs.Int("limit", 0, "at most this many entries (default 10000)")
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	if _, err := cli.ParseFlags(fs, args); err != nil {
		return err
	}
	if *after < 0 || *limit < 0 {
		return cli.Usagef("--after and --limit must not be negative")
	}
	r, err := conn()
	if err != nil {
		return err
	}
	q := url.Values{}
	if *after > 0 {
		q.Set("after", strconv.FormatInt(*after, 10))
	}
	if *limit > 0 {
		q.Set("limit", strconv.Itoa(*limit))
	}
	path := mgmtapi.PathAudit
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var es []store.AuditEntry
	if err := r.do(ctx, "GET", path, nil, &es); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, es)
	}
	for _, e := range es {
		fmt.Fprintf(stdout, "%6d %s %-12s %-8s %3d %s %s %s\n", e.Seq, e.At.Format(time.RFC3339), e.Actor, e.Role, e.Status, e.Action, e.Target, e.Detail)
	}
	return nil
}

func runDeviceEdit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "device edit", "ID [--add-group G] [--remove-group G] [--add-tag T] [--remove-tag T] [server flags]",
		`Adds or removes a device's groups (which rollouts reach it) and tags
(free labels to filter by, such as site-berlin). All changes apply together
or not at all. Flags are repeatable.`)
	var e store.DeviceEdit
	fs.Var((*cli.Strings)(&e.AddGroups), "add-group", "a group to join")
	fs.Var((*cli.Strings)(&e.RemoveGroups), "remove-group", "a group to leave")
	fs.Var((*cli.Strings)(&e.AddTags), "add-tag", "a tag to add")
	fs.Var((*cli.Strings)(&e.RemoveTags), "remove-tag", "a tag to remove")
	conn := remoteFlags(fs)
	pos, err := cli.ParseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return cli.Usagef("want one device ID")
	}
	if len(e.AddGroups)+len(e.RemoveGroups)+len(e.AddTags)+len(e.RemoveTags) == 0 {
		return cli.Usagef("nothing to change: give --add-group, --remove-group, --add-tag or --remove-tag")
	}
	r, err := conn()
	if err != nil {
		return err
	}
	var d store.Device
	if err := r.do(ctx, "PATCH", mgmtapi.PathDevices+"/"+url.PathEscape(pos[0]), jsonBody(e), &d); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: groups [%s], tags [%s]\n", d.ID, strings.Join(d.Groups, " "), strings.Join(d.Tags, " "))
	return nil
}

func runReleaseList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags(stdout, "fieldpatch", "release list", "[--hw-class C] [--json] [server flags]", "Lists the releases, newest first.")
	hw := fs.String("hw-class", "", "only releases for this hardware class")
	asJSON := fs.Bool("json", false, "print JSON")
	conn := remoteFlags(fs)
	r, _, err := connect(fs, conn, args, 0, "takes no arguments")
	if err != nil {
		return err
	}
	path := mgmtapi.PathReleases
	if *hw != "" {
		path += "?hw_class=" + url.QueryEscape(*hw)
	}
	var rels []store.Release
	if err := r.do(ctx, "GET", path, nil, &rels); err != nil {
		return err
	}
	if *asJSON {
		return cli.WriteJSON(stdout, rels)
	}
	fmt.Fprintf(stdout, "%-24s %-10s %-16s %-7s %-10s %s\n", "RELEASE", "VERSION", "HW CLASS", "COUNTER", "BYTES", "UPLOADED")
	for _, rel := range rels {
		fmt.Fprintf(stdout, "%-24s %-10s %-16s %-7d %-10d %s\n", rel.ID, rel.Version, rel.HWClass, rel.SecurityCounter, rel.Length, rel.CreatedAt.Format(time.RFC3339))
	}
	return nil
}
