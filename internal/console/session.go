package console

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/zeitwork/zeitwork/internal/store"
)

const (
	// sessionCookie carries a session's secret (its SHA-256 is the row's key).
	sessionCookie = "zw_session"
	// signinCookie carries the sign-in form's CSRF token (double submit:
	// there is no session yet to tie it to).
	signinCookie = "zw_signin"
	// flashCookie carries a one-time notice to the page after a redirect.
	flashCookie = "zw_flash"
)

// session is a signed-in browser.
type session struct {
	Principal
	csrf   string
	idHash []byte
}

func (s *session) checkCSRF(got string) bool {
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(s.csrf)) == 1
}

func randomToken() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func hashOf(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}

// session returns the request's session, nil when there is none or it
// ended (signed out, expired, or its token revoked).
func (c *Console) session(r *http.Request) (*session, error) {
	ck, err := r.Cookie(sessionCookie)
	if err != nil || ck.Value == "" || len(ck.Value) > 100 {
		return nil, nil
	}
	s := &session{idHash: hashOf(ck.Value)}
	var tokenHash []byte
	err = c.pool.QueryRow(r.Context(), store.Q("ConsoleSessionGet"), s.idHash).Scan(&tokenHash, &s.csrf)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	s.Principal, err = c.backend.TokenPrincipal(r.Context(), tokenHash)
	if errors.Is(err, ErrUnauthorized) {
		// The token was revoked: its sessions end with it.
		_, _ = c.pool.Exec(r.Context(), store.Q("ConsoleSessionDelete"), s.idHash)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (c *Console) setCookie(w http.ResponseWriter, r *http.Request, name, value string, maxAge time.Duration) {
	http.SetCookie(w, &http.Cookie{Name: name, Value: value, Path: "/", MaxAge: int(maxAge.Seconds()),
		HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
}

func (c *Console) clearCookie(w http.ResponseWriter, r *http.Request, name string) {
	http.SetCookie(w, &http.Cookie{Name: name, Value: "", Path: "/", MaxAge: -1,
		HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
}

// signinPage shows the sign-in form with a fresh double-submit token.
func (c *Console) signinPage(w http.ResponseWriter, r *http.Request) {
	s, err := c.session(r)
	if err != nil {
		c.fail(w, r, nil, err)
		return
	}
	if s != nil {
		http.Redirect(w, r, localPath(r.URL.Query().Get("next")), http.StatusSeeOther)
		return
	}
	c.renderSignin(w, r, http.StatusOK, "")
}

func (c *Console) renderSignin(w http.ResponseWriter, r *http.Request, status int, problem string) {
	tok := randomToken()
	c.setCookie(w, r, signinCookie, tok, time.Hour)
	c.render(w, r, status, "signin", &view{Title: "Sign in", CSRF: tok, Error: problem, Flash: c.takeFlash(w, r),
		Data: map[string]string{"Next": localPath(r.URL.Query().Get("next"))}})
}

// signin checks the API token like the API does and opens a session.
func (c *Console) signin(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	if err := r.ParseForm(); err != nil {
		c.renderSignin(w, r, http.StatusBadRequest, "The form could not be read.")
		return
	}
	ck, err := r.Cookie(signinCookie)
	if err != nil || ck.Value == "" || subtle.ConstantTimeCompare([]byte(ck.Value), []byte(r.PostForm.Get("csrf"))) != 1 {
		c.renderSignin(w, r, http.StatusForbidden, "The sign-in form expired. Try again.")
		return
	}
	token := strings.TrimSpace(r.PostForm.Get("token"))
	if token == "" {
		c.renderSignin(w, r, http.StatusBadRequest, "Enter an API token.")
		return
	}
	p, err := c.backend.Authenticate(r.Context(), token)
	if errors.Is(err, ErrUnauthorized) {
		c.renderSignin(w, r, http.StatusUnauthorized, "That token is not valid: it is unknown, revoked or expired.")
		return
	}
	if err != nil {
		c.fail(w, r, nil, err)
		return
	}
	// A new secret at every sign-in: a session id planted before sign-in
	// is never promoted.
	secret := randomToken()
	_, _ = c.pool.Exec(r.Context(), store.Q("ConsoleSessionsExpire"))
	if _, err := c.pool.Exec(r.Context(), store.Q("ConsoleSessionInsert"), hashOf(secret), p.TokenID, randomToken(),
		store.Interval(c.cfg.SessionTTL)); err != nil {
		c.fail(w, r, nil, err)
		return
	}
	c.clearCookie(w, r, signinCookie)
	c.setCookie(w, r, sessionCookie, secret, c.cfg.SessionTTL)
	http.Redirect(w, r, localPath(r.PostForm.Get("next")), http.StatusSeeOther)
}

// signout deletes the session: its cookie stops working everywhere.
func (c *Console) signout(w http.ResponseWriter, r *http.Request, s *session) error {
	if _, err := c.pool.Exec(r.Context(), store.Q("ConsoleSessionDelete"), s.idHash); err != nil {
		return err
	}
	c.clearCookie(w, r, sessionCookie)
	c.flash(w, r, "You are signed out.")
	http.Redirect(w, r, "/signin", http.StatusSeeOther)
	return nil
}

// localPath keeps a post-sign-in redirect on this console: a path, never
// another host ("//evil", "/\evil", "https://…").
func localPath(next string) string {
	if next == "" || next[0] != '/' || strings.HasPrefix(next, "//") || strings.ContainsAny(next, "\\\r\n") {
		return "/projects"
	}
	u, err := url.Parse(next)
	if err != nil || u.Host != "" || u.Scheme != "" {
		return "/projects"
	}
	return next
}

// flash stores a notice for the next page (after a redirect).
func (c *Console) flash(w http.ResponseWriter, r *http.Request, msg string) {
	c.setCookie(w, r, flashCookie, base64.RawURLEncoding.EncodeToString([]byte(msg)), time.Minute)
}

func (c *Console) takeFlash(w http.ResponseWriter, r *http.Request) string {
	ck, err := r.Cookie(flashCookie)
	if err != nil {
		return ""
	}
	c.clearCookie(w, r, flashCookie)
	b, err := base64.RawURLEncoding.DecodeString(ck.Value)
	if err != nil || len(b) > 1000 {
		return ""
	}
	return string(b)
}
