// Command hello is Zeitwork's bundled sample app: a small static HTTP server
// that `make dev` and the end-to-end suite deploy. It says which version it
// is (APP_VERSION), answers its health check on /healthz (failing on purpose
// when FAIL_HEALTH is set, to exercise the health gate), and streams
// Server-Sent Events on /events.
package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"
)

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	version := os.Getenv("APP_VERSION")
	if version == "" {
		version = "v1"
	}
	host, _ := os.Hostname()
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s on %s\n", version, host)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if os.Getenv("FAIL_HEALTH") != "" {
			http.Error(w, "unhealthy on purpose", http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/info", func(w http.ResponseWriter, r *http.Request) {
		wd, _ := os.Getwd()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"version": version, "hostname": host, "uid": os.Getuid(), "gid": os.Getgid(),
			"workdir": wd, "env": os.Environ(), "remote_addr": r.RemoteAddr, "headers": r.Header,
		})
	})
	mux.HandleFunc("/events", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		if n <= 0 || n > 100 {
			n = 3
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fl, _ := w.(http.Flusher)
		for i := range n {
			fmt.Fprintf(w, "data: %s %d\n\n", version, i)
			if fl != nil {
				fl.Flush()
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	// /fs?path=P describes a file as the app sees it (used by the runtime's
	// tests to check image layers inside a booted VM).
	mux.HandleFunc("/fs", func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Query().Get("path")
		out := map[string]any{"path": p}
		if fi, err := os.Lstat(p); err != nil {
			out["exists"] = false
		} else {
			st := fi.Sys().(*syscall.Stat_t)
			out["exists"], out["mode"], out["uid"], out["gid"], out["ino"] = true, fi.Mode().String(), st.Uid, st.Gid, st.Ino
			if fi.Mode()&os.ModeSymlink != 0 {
				out["link"], _ = os.Readlink(p)
			} else if fi.Mode().IsRegular() && fi.Size() < 4096 {
				b, _ := os.ReadFile(p)
				out["content"] = string(b)
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	})
	// /dial?addr=H:P reports whether the app can open a TCP connection
	// (used to check network isolation).
	mux.HandleFunc("/dial", func(w http.ResponseWriter, r *http.Request) {
		c, err := net.DialTimeout("tcp", r.URL.Query().Get("addr"), time.Second)
		if err != nil {
			fmt.Fprintf(w, "blocked: %v\n", err)
			return
		}
		c.Close()
		fmt.Fprintln(w, "connected")
	})
	if os.Getenv("EXIT_AT_START") != "" {
		log.Fatal("exiting at start on purpose")
	}
	log.Printf("hello %s listening on :%s", version, port)
	log.Fatal(http.ListenAndServe(":"+port, mux))
}
