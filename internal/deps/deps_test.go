package deps

import (
	"bytes"
	"encoding/json"
	"go/parser"
	"go/token"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func goList(t *testing.T, args ...string) []Package {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list", "-json"}, args...)...)
	cmd.Dir = "../.."
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []Package
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p Package
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

// The module obeys its import rules.
func TestImportRules(t *testing.T) {
	pkgs := goList(t, "-test", "./...")
	if len(pkgs) < 5 {
		t.Fatalf("go list found only %d packages", len(pkgs))
	}
	for _, line := range Check(pkgs) {
		t.Error(line)
	}
}

// The agent binary links no server code and no unlisted module.
func TestAgentDependencies(t *testing.T) {
	all := goList(t, "-deps", "./cmd/fieldpatch-agent")
	modules := map[string]string{}
	var agent *Package
	for i, p := range all {
		if p.Module != nil && !p.Standard {
			modules[p.ImportPath] = p.Module.Path
		}
		if p.ImportPath == Module+"/cmd/fieldpatch-agent" {
			agent = &all[i]
		}
	}
	if agent == nil {
		t.Fatal("agent package not found")
	}
	// Our own packages belong to our module and are judged by side, not module.
	for p := range modules {
		if SideOf(p) != Foreign {
			delete(modules, p)
		}
	}
	for _, line := range CheckAgent(*agent, modules) {
		t.Error(line)
	}
}

// The checks catch what they are meant to catch.
func TestChecksCatchViolations(t *testing.T) {
	pkgs := []Package{
		{ImportPath: Module + "/internal/device/agent", Imports: []string{Module + "/internal/server/store", "fmt"}},
		{ImportPath: Module + "/internal/server/store", Imports: []string{Module + "/internal/device/slot"}},
		{ImportPath: Module + "/internal/image", Imports: []string{Module + "/internal/device/boot"}},
		{ImportPath: Module + "/internal/somethingnew", Imports: nil},
		{ImportPath: Module + "/cmd/fieldpatch", Imports: []string{Module + "/internal/server/store", Module + "/internal/device/slot"}},
	}
	got := Check(pkgs)
	if len(got) != 4 {
		t.Fatalf("Check found %d problems, want 4: %q", len(got), got)
	}
	agent := Package{ImportPath: Module + "/cmd/fieldpatch-agent", Deps: []string{"fmt", Module + "/internal/server/deviceapi", "github.com/example/big"}}
	got = CheckAgent(agent, map[string]string{"github.com/example/big": "github.com/example/big"})
	if len(got) != 2 {
		t.Fatalf("CheckAgent found %d problems, want 2: %q", len(got), got)
	}
}

// Every package has a doc comment.
func TestEveryPackageDocumented(t *testing.T) {
	for _, p := range goList(t, "./...") {
		dir := strings.TrimPrefix(p.ImportPath, Module)
		files, _ := filepath.Glob(filepath.Join("../..", dir, "*.go"))
		documented := false
		for _, f := range files {
			if strings.HasSuffix(f, "_test.go") {
				continue
			}
			af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.PackageClauseOnly|parser.ParseComments)
			if err != nil {
				t.Fatal(err)
			}
			documented = documented || af.Doc != nil
		}
		if !documented {
			t.Errorf("package %s has no doc comment", p.ImportPath)
		}
	}
}
