package rootfs

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// User is an image's USER resolved to numeric ids, as a container runtime
// resolves it.
type User struct {
	UID    uint32   `json:"uid"`
	GID    uint32   `json:"gid"`
	Groups []uint32 `json:"groups,omitempty"` // supplementary groups from /etc/group
	Home   string   `json:"home"`
}

// ResolveUser maps an image's USER ("", "name", "uid", "name:group",
// "uid:gid", …) to numeric ids using the image's /etc/passwd and
// /etc/group, with Docker's rules: a numeric uid need not exist in
// /etc/passwd (its group is then 0 and its home "/"); a name must.
func ResolveUser(tree, spec string) (User, error) {
	u := User{Home: "/"}
	root, err := os.OpenRoot(tree)
	if err != nil {
		return u, err
	}
	defer root.Close()
	passwd, _ := root.ReadFile("etc/passwd")
	group, _ := root.ReadFile("etc/group")
	return resolveUser(spec, string(passwd), string(group))
}

func resolveUser(spec, passwd, group string) (User, error) {
	u := User{Home: "/"}
	if spec == "" {
		spec = "0"
	}
	name, grp, hasGroup := strings.Cut(spec, ":")
	if name == "" {
		return u, fmt.Errorf("image USER %q has no user", spec)
	}
	uname := ""
	if n, ok := parseID(name); ok {
		u.UID = n
		if e := findEntry(passwd, 7, func(f []string) bool { return f[2] == name }); e != nil {
			u.GID, _ = parseID(e[3])
			u.Home, uname = e[5], e[0]
		}
	} else {
		e := findEntry(passwd, 7, func(f []string) bool { return f[0] == name })
		if e == nil {
			return u, fmt.Errorf("image USER %q is not in the image's /etc/passwd", name)
		}
		var ok1, ok2 bool
		u.UID, ok1 = parseID(e[2])
		u.GID, ok2 = parseID(e[3])
		if !ok1 || !ok2 {
			return u, fmt.Errorf("image /etc/passwd has a bad entry for %q", name)
		}
		u.Home, uname = e[5], name
	}
	if hasGroup {
		if n, ok := parseID(grp); ok {
			u.GID = n
		} else {
			e := findEntry(group, 4, func(f []string) bool { return f[0] == grp })
			if e == nil {
				return u, fmt.Errorf("image group %q is not in the image's /etc/group", grp)
			}
			gid, ok := parseID(e[2])
			if !ok {
				return u, fmt.Errorf("image /etc/group has a bad entry for %q", grp)
			}
			u.GID = gid
		}
	} else if uname != "" {
		// Supplementary groups: every group that lists the user by name.
		for line := range strings.SplitSeq(group, "\n") {
			f := strings.Split(line, ":")
			if len(f) < 4 {
				continue
			}
			gid, ok := parseID(f[2])
			if !ok || gid == u.GID {
				continue
			}
			for m := range strings.SplitSeq(f[3], ",") {
				if strings.TrimSpace(m) == uname {
					u.Groups = append(u.Groups, gid)
					break
				}
			}
		}
	}
	if u.Home == "" {
		u.Home = "/"
	}
	return u, nil
}

func parseID(s string) (uint32, bool) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32)
	return uint32(n), err == nil
}

// findEntry returns the fields of the first line of a colon-separated
// database with at least minFields fields that matches.
func findEntry(db string, minFields int, match func([]string) bool) []string {
	for line := range strings.SplitSeq(db, "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Split(strings.TrimRight(line, "\r"), ":")
		if len(f) >= minFields && match(f) {
			return f
		}
	}
	return nil
}
