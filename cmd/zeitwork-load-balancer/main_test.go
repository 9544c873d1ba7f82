package main

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/zeitwork/zeitwork/internal/servicetest"
)

func TestBinary(t *testing.T) {
	bin := servicetest.Binary(t, "zeitwork-load-balancer")
	servicetest.ExpectBadConfig(t, bin, map[string]string{"LB_ALGORITHM": "random", "LB_LISTENERS": ":1", "LB_PROXY_PROTOCOL": "v3", "LB_HEALTH_FALL": "0"},
		"LB_ALGORITHM", "LB_LISTENERS", "LB_BACKENDS", "LB_PROXY_PROTOCOL", "LB_HEALTH_FALL")

	// A backend that greets, so the relay is checked end to end.
	be, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	go func() {
		for {
			c, err := be.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hello\n"))
			c.Close()
		}
	}()
	pub, admin := servicetest.FreeAddr(t), servicetest.FreeAddr(t)
	p := servicetest.Start(t, bin, map[string]string{
		"LB_LISTENERS": pub + "=>1", "LB_BACKENDS": be.Addr().String(), "LB_ADMIN_ADDR": admin,
		"LB_ALGORITHM": "ip-hash", "LB_PROXY_PROTOCOL": "off", "LB_DRAIN_TIMEOUT": "5s",
	}, servicetest.URL(admin)+"/health")
	servicetest.CheckContract(t, bin, p, servicetest.URL(admin), "zeitwork_load_balancer")
	if code, body := servicetest.Get(t, servicetest.URL(admin)+"/health"); code != 200 || !strings.Contains(body, `"algorithm":"ip-hash"`) || !strings.Contains(body, `"healthy_backends":1`) {
		t.Fatalf("/health = %d %s", code, body)
	}
	if code, body := servicetest.Get(t, servicetest.URL(admin)+"/health/ready"); code != 200 || !strings.Contains(body, `"edges":"ok"`) {
		t.Fatalf("/health/ready = %d %s", code, body)
	}
	c, err := net.DialTimeout("tcp", pub, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || line != "hello\n" {
		t.Fatalf("relay: %q %v", line, err)
	}
	if code, body := servicetest.Get(t, servicetest.URL(admin)+"/backends"); code != 200 || !strings.Contains(body, `"state":"up"`) {
		t.Fatalf("/backends = %d %s", code, body)
	}
	if _, body := servicetest.Get(t, servicetest.URL(admin)+"/metrics"); !strings.Contains(body, "zeitwork_load_balancer_connections_accepted_total 1") {
		t.Fatalf("metrics do not count the connection")
	}
	p.StopOK(t, 15*time.Second)
}
