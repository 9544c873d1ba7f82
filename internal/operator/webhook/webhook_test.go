package webhook

import (
	"os"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestParseGitHubExamples(t *testing.T) {
	for _, tc := range []struct {
		file, repo, branch, after, message string
		deploys                            bool
	}{
		{"testdata/push-branch.json", "octocat/Hello-World", "main", "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c", "Update README.md", true},
		// GitHub's documented example is a tag deletion: never a deployment.
		{"testdata/push.json", "Codertocat/Hello-World", "", ZeroSHA, "", false},
	} {
		body, err := os.ReadFile(tc.file)
		if err != nil {
			t.Fatal(err)
		}
		p, err := ParsePush(body)
		if err != nil {
			t.Fatalf("%s: %v", tc.file, err)
		}
		if p.Repository.FullName != tc.repo || p.Branch() != tc.branch || p.After != tc.after || p.Deploys() != tc.deploys ||
			p.CommitMessage() != tc.message {
			t.Errorf("%s: %+v branch=%q deploys=%v", tc.file, p, p.Branch(), p.Deploys())
		}
	}
}

func TestParsePushRejects(t *testing.T) {
	for _, body := range []string{
		``, `[]`, `{"ref":"refs/heads/main","after":"abc1234"}`,
		`{"ref":"main","after":"abc1234","repository":{"full_name":"a/b"}}`,
		`{"ref":"refs/heads/main","after":"XYZ","repository":{"full_name":"a/b"}}`,
		`{"ref":"refs/heads/main","after":"abc","repository":{"full_name":"a/b"}}`,
	} {
		if _, err := ParsePush([]byte(body)); err == nil {
			t.Errorf("ParsePush(%s) accepted", body)
		}
	}
}

func TestMessage(t *testing.T) {
	long := strings.Repeat("é", MaxMessage+5)
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"fix: a\n\nbody", "fix: a\n\nbody"},
		{"a\x00b", "ab"},
		{"a\xffb", "a\uFFFDb"},
		{long, strings.Repeat("é", MaxMessage)},
	} {
		if got := Message(tc.in); got != tc.want {
			t.Errorf("Message(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	p, err := ParsePush([]byte(`{"ref":"refs/heads/main","after":"abc1234","repository":{"full_name":"a/b"},"head_commit":{"message":"` + long + `"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := p.CommitMessage(); got != strings.Repeat("é", MaxMessage) {
		t.Errorf("CommitMessage has %d characters", utf8.RuneCountInString(got))
	}
}

func TestVerify(t *testing.T) {
	body := []byte(`{"zen":"Keep it logically awesome."}`)
	good := Sign("s3cret", body)
	// GitHub's documented test vector: secret "It's a Secret to Everybody",
	// payload "Hello, World!".
	const vector = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
	for _, tc := range []struct {
		secret, header string
		body           []byte
		want           bool
	}{
		{"It's a Secret to Everybody", vector, []byte("Hello, World!"), true},
		{"s3cret", good, body, true},
		{"s3cret", good, append(body, ' '), false},
		{"other", good, body, false},
		{"", Sign("", body), body, false},
		{"s3cret", strings.TrimPrefix(good, "sha256="), body, false},
		{"s3cret", "sha1=" + strings.TrimPrefix(good, "sha256="), body, false},
		{"s3cret", "sha256=zz", body, false},
		{"s3cret", "", body, false},
	} {
		if got := Verify(tc.secret, tc.header, tc.body); got != tc.want {
			t.Errorf("Verify(%q, %q) = %v, want %v", tc.secret, tc.header, got, tc.want)
		}
	}
}

func FuzzParsePush(f *testing.F) {
	for _, file := range []string{"testdata/push.json", "testdata/push-branch.json"} {
		b, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"ref":"refs/heads/x","after":"0000000","repository":{"full_name":"a/b"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePush(b)
		if err != nil {
			return
		}
		if p.Repository.FullName == "" || !strings.HasPrefix(p.Ref, "refs/") {
			t.Fatalf("accepted %+v", p)
		}
		if p.Deploys() && (!ValidSHA(p.After) || p.Branch() == "") {
			t.Fatalf("deploys %+v", p)
		}
		if m := p.CommitMessage(); !utf8.ValidString(m) || utf8.RuneCountInString(m) > MaxMessage || strings.ContainsRune(m, 0) {
			t.Fatalf("unbounded commit message %q", m)
		}
	})
}

func FuzzVerify(f *testing.F) {
	f.Add("s", "sha256=00", []byte("x"))
	f.Fuzz(func(t *testing.T, secret, header string, body []byte) {
		if Verify(secret, header, body) && header != Sign(secret, body) && !strings.EqualFold(header, Sign(secret, body)) {
			t.Fatalf("Verify accepted %q for a body signed %q", header, Sign(secret, body))
		}
	})
}
