// Command testapp is the app the runtime's tests boot in microVMs: a
// static HTTP server that reports what it sees from inside the VM —
// identity, environment, working directory, and files (for checking image
// layer semantics) — and probes the network for isolation checks.
//
//	GET /            "hello from <hostname>"
//	GET /healthz     "ok"
//	GET /report?path=P&path=Q   identity, env, workdir and each path's lstat
//	GET /dial?addr=H:P          "connected" or "blocked: <error>"
//	GET /stream?n=N[&hold=1]    N chunks, flushed 50 ms apart (then held open)
//	GET /echo (WebSocket upgrade done by hand: echoes bytes back)
//
// EXIT_AT_START=<code> makes it exit at once (crash-loop tests).
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if c := os.Getenv("EXIT_AT_START"); c != "" {
		code, _ := strconv.Atoi(c)
		fmt.Fprintln(os.Stderr, "exiting at start on purpose")
		os.Exit(code)
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	host, _ := os.Hostname()
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s\n", host)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/report", func(w http.ResponseWriter, r *http.Request) {
		wd, _ := os.Getwd()
		groups, _ := os.Getgroups()
		files := map[string]any{}
		for _, p := range r.URL.Query()["path"] {
			files[p] = describe(p)
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"hostname": host, "uid": os.Getuid(), "gid": os.Getgid(), "groups": groups,
			"workdir": wd, "env": os.Environ(), "files": files,
			"remote_addr": r.RemoteAddr, "host_header": r.Host, "headers": r.Header,
		})
	})
	mux.HandleFunc("/dial", func(w http.ResponseWriter, r *http.Request) {
		c, err := net.DialTimeout("tcp", r.URL.Query().Get("addr"), 2*time.Second)
		if err != nil {
			fmt.Fprintf(w, "blocked: %v\n", err)
			return
		}
		c.Close()
		fmt.Fprintln(w, "connected")
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		n = max(1, min(n, 100))
		fl := w.(http.Flusher)
		for i := range n {
			fmt.Fprintf(w, "chunk %d\n", i)
			fl.Flush()
			time.Sleep(50 * time.Millisecond)
		}
		if r.URL.Query().Get("hold") != "" { // keep the response open until the client leaves
			select {
			case <-r.Context().Done():
			case <-time.After(60 * time.Second):
			}
		}
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "" {
			http.Error(w, "upgrade required", http.StatusUpgradeRequired)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", r.Header.Get("Upgrade"))
		_ = brw.Flush()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		_, _ = io.Copy(c, brw)
	})
	log.SetOutput(os.Stdout)
	log.SetFlags(0)
	log.Printf("testapp listening on :%s as uid %d", port, os.Getuid())
	fmt.Fprintln(os.Stderr, "testapp stderr line")
	log.Fatal(http.ListenAndServe(":"+port, mux))
}

// describe is what the tests compare: type, permissions, owner, inode,
// link count, symlink target, small contents, one xattr.
func describe(p string) map[string]any {
	fi, err := os.Lstat(p)
	if err != nil {
		return map[string]any{"exists": false}
	}
	st := fi.Sys().(*syscall.Stat_t)
	out := map[string]any{"exists": true, "mode": fi.Mode().String(), "uid": st.Uid, "gid": st.Gid,
		"ino": st.Ino, "nlink": st.Nlink}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		out["link"], _ = os.Readlink(p)
	case fi.Mode()&os.ModeDevice != 0:
		out["rdev"] = fmt.Sprintf("%d:%d", st.Rdev>>8&0xfff, st.Rdev&0xff)
	case fi.Mode().IsRegular() && fi.Size() < 4096:
		b, _ := os.ReadFile(p)
		out["content"] = string(b)
	}
	buf := make([]byte, 256)
	if n, err := syscall.Getxattr(p, "user.zeitwork", buf); err == nil {
		out["xattr"] = string(buf[:n])
	}
	return out
}
