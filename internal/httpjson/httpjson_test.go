package httpjson

import (
	"net/http/httptest"
	"testing"
)

func TestWriteError(t *testing.T) {
	rec := httptest.NewRecorder()
	Write(rec, 409, Error("conflict", `a "quoted" <message>`))
	if rec.Code != 409 || rec.Header().Get("Content-Type") != "application/json" || rec.Header().Get("Cache-Control") != "no-store" {
		t.Fatalf("%d %v", rec.Code, rec.Header())
	}
	if got, want := rec.Body.String(), `{"error":{"code":"conflict","message":"a \"quoted\" \u003cmessage\u003e"}}`+"\n"; got != want {
		t.Fatalf("body %q, want %q", got, want)
	}
}
