package operator

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
)

// sealer encrypts project environment variables with AES-256-GCM; the
// additional data binds a ciphertext to its project and name.
type sealer struct{ aead cipher.AEAD }

func newSealer(b64key string) (*sealer, error) {
	key, err := base64.StdEncoding.DecodeString(b64key)
	if err != nil || len(key) != 32 {
		return nil, errors.New("must be 32 bytes, base64-encoded (e.g. head -c32 /dev/urandom | base64)")
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &sealer{aead: aead}, nil
}

func (s *sealer) seal(projectID, name, value string) (nonce, ct []byte) {
	nonce = make([]byte, s.aead.NonceSize())
	_, _ = rand.Read(nonce)
	return nonce, s.aead.Seal(nil, nonce, []byte(value), []byte(projectID+"\x00"+name))
}

func (s *sealer) open(projectID, name string, nonce, ct []byte) (string, error) {
	pt, err := s.aead.Open(nil, nonce, ct, []byte(projectID+"\x00"+name))
	if err != nil {
		return "", fmt.Errorf("cannot decrypt %s: %w", name, err)
	}
	return string(pt), nil
}

// newToken returns a random API token and its stored hash.
func newToken() (string, []byte) {
	var b [24]byte
	_, _ = rand.Read(b[:])
	tok := "zw_" + hex.EncodeToString(b[:])
	return tok, hashToken(tok)
}

func hashToken(tok string) []byte {
	h := sha256.Sum256([]byte(tok))
	return h[:]
}
