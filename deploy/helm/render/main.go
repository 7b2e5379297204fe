// Command render renders a Helm chart the way `helm template` does, for
// machines without helm: Go's text/template with Sprig's functions and
// Helm's own (include, tpl, required, toYaml, fromYaml, toJson), values
// from the chart's values.yaml merged with -f files and --set key=value.
// It builds offline from Debian's Go packages (see deploy/helm/check.sh).
//
//	render [-f values.yaml]... [--set a.b=c]... [--name N] [--namespace NS] CHART
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"sigs.k8s.io/yaml"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "render: "+format+"\n", a...)
	os.Exit(1)
}

func readYAML(path string) map[string]interface{} {
	b, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(b, &m); err != nil {
		fail("%s: %v", path, err)
	}
	return m
}

// merge copies src into dst, maps merged key by key (Helm's coalescing).
func merge(dst, src map[string]interface{}) {
	for k, v := range src {
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
}

// set applies one --set a.b.c=value (the value read as YAML).
func set(values map[string]interface{}, kv string) {
	eq := strings.Index(kv, "=")
	if eq < 0 {
		fail("--set %q is not key=value", kv)
	}
	var v interface{}
	if err := yaml.Unmarshal([]byte(kv[eq+1:]), &v); err != nil {
		fail("--set %q: %v", kv, err)
	}
	keys := strings.Split(kv[:eq], ".")
	m := values
	for _, k := range keys[:len(keys)-1] {
		next, ok := m[k].(map[string]interface{})
		if !ok {
			next = map[string]interface{}{}
			m[k] = next
		}
		m = next
	}
	m[keys[len(keys)-1]] = v
}

func main() {
	var files, sets list
	flag.Var(&files, "f", "values file (repeatable)")
	flag.Var(&sets, "set", "key=value (repeatable)")
	name := flag.String("name", "tandem", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	flag.Parse()
	if flag.NArg() != 1 {
		fail("usage: render [-f values.yaml]... [--set k=v]... CHART")
	}
	chart := flag.Arg(0)
	meta := readYAML(filepath.Join(chart, "Chart.yaml"))
	values := readYAML(filepath.Join(chart, "values.yaml"))
	for _, f := range files {
		merge(values, readYAML(f))
	}
	for _, kv := range sets {
		set(values, kv)
	}
	chartData := map[string]interface{}{}
	for k, v := range meta {
		chartData[strings.ToUpper(k[:1])+k[1:]] = v
	}
	paths, _ := filepath.Glob(filepath.Join(chart, "templates", "*"))
	sort.Strings(paths)

	t := template.New("chart").Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	funcs["toYaml"] = func(v interface{}) string {
		b, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(b), "\n")
	}
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		_ = yaml.Unmarshal([]byte(s), &m)
		return m
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf("%s", msg)
		}
		return v, nil
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := t.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		c, err := t.Clone()
		if err != nil {
			return "", err
		}
		x, err := c.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = x.Execute(&buf, data)
		return buf.String(), err
	}
	t.Funcs(funcs)
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			fail("%v", err)
		}
		if _, err := t.New(filepath.Join(chartData["Name"].(string), "templates", filepath.Base(p))).Parse(string(b)); err != nil {
			fail("%v", err)
		}
	}
	out := os.Stdout
	for _, p := range paths {
		base := filepath.Base(p)
		if strings.HasPrefix(base, "_") || !(strings.HasSuffix(base, ".yaml") || strings.HasSuffix(base, ".yml")) {
			continue
		}
		data := map[string]interface{}{
			"Values":  values,
			"Chart":   chartData,
			"Release": map[string]interface{}{"Name": *name, "Namespace": *namespace, "Service": "Helm", "IsInstall": true, "IsUpgrade": false, "Revision": 1},
			"Template": map[string]interface{}{"Name": filepath.Join(chartData["Name"].(string), "templates", base), "BasePath": filepath.Join(chartData["Name"].(string), "templates")},
			"Capabilities": map[string]interface{}{"KubeVersion": map[string]interface{}{"Version": "v1.31.0", "Major": "1", "Minor": "31"}},
		}
		var buf bytes.Buffer
		if err := t.ExecuteTemplate(&buf, data["Template"].(map[string]interface{})["Name"].(string), data); err != nil {
			fail("%v", err)
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(out, "---\n# Source: %s\n%s\n", data["Template"].(map[string]interface{})["Name"], strings.TrimSpace(text))
	}
}
