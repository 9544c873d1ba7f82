// Package secrets seals project environment variables with AES-256-GCM and
// mints API tokens, of which only a hash is ever stored.
package secrets

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

// Sealer encrypts values with AES-256-GCM under one key. The additional
// data binds a ciphertext to its project and variable name, so a
// ciphertext copied to another row does not decrypt.
type Sealer struct{ aead cipher.AEAD }

// NewSealer takes the key as 32 bytes, base64-encoded (ENCRYPTION_KEY).
func NewSealer(b64key string) (*Sealer, error) {
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
	return &Sealer{aead: aead}, nil
}

// Seal encrypts value with a fresh random nonce.
func (s *Sealer) Seal(projectID, name, value string) (nonce, ciphertext []byte) {
	nonce = make([]byte, s.aead.NonceSize())
	_, _ = rand.Read(nonce)
	return nonce, s.aead.Seal(nil, nonce, []byte(value), aad(projectID, name))
}

// Open decrypts what Seal produced for the same project and name.
func (s *Sealer) Open(projectID, name string, nonce, ciphertext []byte) (string, error) {
	if len(nonce) != s.aead.NonceSize() {
		return "", fmt.Errorf("cannot decrypt %s: bad nonce length %d", name, len(nonce))
	}
	pt, err := s.aead.Open(nil, nonce, ciphertext, aad(projectID, name))
	if err != nil {
		return "", fmt.Errorf("cannot decrypt %s: %w", name, err)
	}
	return string(pt), nil
}

func aad(projectID, name string) []byte { return []byte(projectID + "\x00" + name) }

// TokenPrefix starts every API token, so leaked tokens are easy to scan for.
const TokenPrefix = "zw_"

// NewToken returns a random API token (192 bits) and the hash to store.
func NewToken() (token string, hash []byte) {
	var b [24]byte
	_, _ = rand.Read(b[:])
	token = TokenPrefix + hex.EncodeToString(b[:])
	return token, HashToken(token)
}

// HashToken is the stored form of a token: SHA-256 (tokens are random, so
// a fast hash is enough).
func HashToken(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}
