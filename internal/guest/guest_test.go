package guest

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	code := 3
	frames := []*Frame{
		{Type: TypeConfig, Config: &Config{Entrypoint: []string{"/app"}, Cmd: []string{"-v"}, Env: []string{"A=1"}, UID: 1000, Address: "10.0.0.2/30"}},
		{Type: TypeLog, Stream: "stdout", Line: strings.Repeat("x", maxLine+10)},
		{Type: TypeExit, Code: &code},
	}
	for _, f := range frames {
		if err := w.Send(f); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(&buf)
	f, err := r.Next()
	if err != nil || f.Config.UID != 1000 || strings.Join(f.Config.Argv(), " ") != "/app -v" {
		t.Fatalf("config: %+v %v", f, err)
	}
	if f, err = r.Next(); err != nil || len(f.Line) != maxLine {
		t.Fatalf("log line not truncated: %d %v", len(f.Line), err)
	}
	if f, err = r.Next(); err != nil || *f.Code != 3 {
		t.Fatalf("exit: %+v %v", f, err)
	}
	if _, err = r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("want EOF, got %v", err)
	}
}

func TestRejectsBadFrames(t *testing.T) {
	for _, in := range []string{`{"type":"config"}`, `{"type":"config","config":{}}`, `{"type":"exit"}`, `{"type":"bogus"}`, `not json`} {
		if _, err := NewReader(strings.NewReader(in + "\n")).Next(); err == nil {
			t.Errorf("accepted %s", in)
		}
	}
}

func FuzzReader(f *testing.F) {
	f.Add([]byte(`{"type":"config","config":{"cmd":["/x"]}}` + "\n" + `{"type":"stop"}` + "\n"))
	f.Add([]byte(`{"type":"log","stream":"stdout","line":"hi"}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := NewReader(bytes.NewReader(in))
		for range 100 {
			fr, err := r.Next()
			if err != nil {
				return
			}
			if fr.Validate() != nil {
				t.Fatal("Next returned an invalid frame")
			}
		}
	})
}
