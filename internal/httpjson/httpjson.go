// Package httpjson writes JSON responses and the platform's one error
// shape, {"error":{"code":"…","message":"…"}}, shared by every HTTP API
// (operator, node agent, data plane, service admin endpoints).
package httpjson

import (
	"encoding/json"
	"net/http"
)

// ErrorBody is the error document.
type ErrorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// Error builds an error document.
func Error(code, msg string) ErrorBody {
	var e ErrorBody
	e.Error.Code, e.Error.Message = code, msg
	return e
}

// Write sends v as JSON with status code; responses are never cached.
func Write(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
