package image

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error returned by Read and Verify wraps one of them
// inside an *Error that names the region and offset, so callers can test
// with errors.Is and report with errors.As.
var (
	// Malformed images.
	ErrBadMagic      = errors.New("bad magic")
	ErrTruncated     = errors.New("truncated")
	ErrSizeOverflow  = errors.New("size fields overflow")
	ErrTLVOverrun    = errors.New("TLV runs past the end of its area")
	ErrBadTLV        = errors.New("invalid TLV")
	ErrUnknownTLV    = errors.New("unknown TLV type")
	ErrUnsupported   = errors.New("unsupported image feature")
	ErrTrailingBytes = errors.New("unexpected bytes after the image")

	// Security failures: the image is well formed but not authentic.
	ErrHashMismatch = errors.New("SHA-256 of the signed region does not match")
	ErrBadSignature = errors.New("signature does not verify")
	ErrUntrusted    = errors.New("no signature by a trusted key")
)

// Region names a part of an image.
type Region string

// The regions of an image, in file order.
const (
	RegionHeader      Region = "header"
	RegionPayload     Region = "payload"
	RegionProtected   Region = "protected TLV area"
	RegionUnprotected Region = "unprotected TLV area"
	RegionTrailer     Region = "trailer"
)

// Error is a failure located in an image.
type Error struct {
	Region Region
	Offset int64  // from the start of the image
	Err    error  // one of the sentinel errors above
	Detail string // what exactly was wrong
}

func (e *Error) Error() string {
	s := fmt.Sprintf("image %s at offset %d (0x%x): %v", e.Region, e.Offset, e.Offset, e.Err)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

func fail(region Region, off int64, err error, format string, args ...any) *Error {
	return &Error{Region: region, Offset: off, Err: err, Detail: fmt.Sprintf(format, args...)}
}

// IsSecurity reports whether err says an image is not authentic (as opposed
// to malformed or unreadable). A security failure must never be retried
// silently.
func IsSecurity(err error) bool {
	return errors.Is(err, ErrHashMismatch) || errors.Is(err, ErrBadSignature) || errors.Is(err, ErrUntrusted)
}
