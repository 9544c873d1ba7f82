package console

import (
	"bytes"
	"fmt"
	"html/template"
	"net/http"
	"strings"
	"time"
)

// view is what every page template gets.
type view struct {
	Title   string
	Nav     string // "projects" or "org": the current section
	Session *session
	CSRF    string
	Flash   string // a notice after a redirect
	Error   string // what went wrong with the last form
	Data    any
	c       *Console
}

// Asset is the versioned URL of a static file.
func (v *view) Asset(name string) string { return v.c.assetURL(name) }

// Org is the signed-in organisation's name.
func (v *view) Org() string {
	if v.Session == nil {
		return ""
	}
	return v.Session.OrgName
}

var funcs = template.FuncMap{
	"age":   age,
	"clock": clock,
	"iso":   func(t time.Time) string { return t.UTC().Format(time.RFC3339) },
	"full":  func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 UTC") },
	"sha": func(s string) string {
		if len(s) > 12 {
			return s[:12]
		}
		return s
	},
	"project": projectPath,
	"note":    statusNote,
	// firstline is a commit message's subject.
	"firstline": func(s string) string {
		s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
		return strings.TrimSpace(s)
	},
}

// statusNote describes the newest deployment of a project in a list.
func statusNote(status string) string {
	switch status {
	case "failed":
		return "last deploy failed"
	case "pending", "building", "preparing", "starting", "healthy":
		return "deploying: " + status
	}
	return status
}

// pages are parsed once: each page template with the layout and partials.
var pages = func() map[string]*template.Template {
	base := template.Must(template.New("").Funcs(funcs).ParseFS(files, "templates/layout.html", "templates/partials.html"))
	out := map[string]*template.Template{}
	for _, name := range []string{"signin", "projects", "project", "logs", "org", "confirm", "error"} {
		out[name] = template.Must(template.Must(base.Clone()).ParseFS(files, "templates/"+name+".html"))
	}
	return out
}()

// render writes a whole page. Signed-in pages are never cached: they show
// the organisation's data and carry the session's CSRF token.
func (c *Console) render(w http.ResponseWriter, r *http.Request, status int, page string, v *view) {
	v.c = c
	if v.Session != nil && v.CSRF == "" {
		v.CSRF = v.Session.csrf
	}
	var buf bytes.Buffer
	if err := pages[page].ExecuteTemplate(&buf, "layout", v); err != nil {
		c.log.Error("cannot render page", "page", page, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	c.writeHTML(w, status, buf.Bytes())
}

// renderFragment writes one partial template (no layout).
func (c *Console) renderFragment(w http.ResponseWriter, name string, data any) {
	var buf bytes.Buffer
	if err := pages["project"].ExecuteTemplate(&buf, name, data); err != nil {
		c.log.Error("cannot render fragment", "fragment", name, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	c.writeHTML(w, http.StatusOK, buf.Bytes())
}

func (c *Console) writeHTML(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func (c *Console) renderError(w http.ResponseWriter, r *http.Request, s *session, e *Error) {
	title := http.StatusText(e.Status)
	if e.Status == http.StatusNotFound {
		title = "Not found"
	}
	if isFragment(r) {
		// The polling script reads the status; a page would be noise.
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(e.Status)
		_, _ = fmt.Fprintln(w, e.Message)
		return
	}
	c.render(w, r, e.Status, "error", &view{Title: title, Session: s, Error: e.Message, Data: e})
}

// age is a short relative time ("12 s ago"); the script keeps it current.
func age(t time.Time) string {
	return ageAt(t, time.Now())
}

func ageAt(t, now time.Time) string {
	d := now.Sub(t)
	switch {
	case d < 5*time.Second:
		return "just now"
	case d < time.Minute:
		return fmt.Sprintf("%d s ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%d min ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%d h ago", int(d.Hours()))
	default:
		return fmt.Sprintf("%d d ago", int(d.Hours()/24))
	}
}

// clock is a time of day in UTC, with the date when it is not today.
func clock(t time.Time) string {
	t = t.UTC()
	if now := time.Now().UTC(); t.YearDay() == now.YearDay() && t.Year() == now.Year() {
		return t.Format("15:04:05")
	}
	return t.Format("Jan 2 15:04")
}
