package image

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// MCUboot's boot magic for a maximum write alignment of 8.
var bootMagic8 = [16]byte{0x77, 0xc2, 0x95, 0xf3, 0x60, 0xd2, 0xef, 0x7f, 0x35, 0x52, 0x50, 0x0f, 0x2c, 0xb6, 0x79, 0x80}

// For larger alignments the first two bytes are the alignment (little endian)
// followed by these 14.
var bootMagicTail = [14]byte{0x2d, 0xe1, 0x5d, 0x29, 0x41, 0x0b, 0x8d, 0x77, 0x67, 0x9c, 0x11, 0x0f, 0x1f, 0x8a}

const (
	magicLen        = 16
	maxSectors      = 128 // imgtool's default --max-sectors
	trailerTailKeep = 64  // magic row plus image_ok row at the largest alignment (32 + 32)
)

// Trailer describes erased fill and an MCUboot image trailer after the TLVs.
type Trailer struct {
	Len         int64 `json:"len"`          // bytes after the TLVs: fill and trailer
	SlotSize    int64 `json:"slot_size"`    // image and trailer together: the slot the image was padded to
	ErasedValue byte  `json:"erased_value"` // 0xff or 0x00
	MaxAlign    int   `json:"max_align"`    // 8, 16 or 32, told by the magic
	ImageOK     bool  `json:"image_ok"`     // image_ok set (imgtool --confirm)
}

func bootMagic(maxAlign int) [16]byte {
	if maxAlign == 8 {
		return bootMagic8
	}
	var m [16]byte
	binary.LittleEndian.PutUint16(m[:], uint16(maxAlign))
	copy(m[2:], bootMagicTail[:])
	return m
}

func alignUp(n, a int) int { return (n + a - 1) / a * a }

// trailerSize is imgtool's _trailer_size for a swap-capable image without
// encryption: the status area, four flag rows and the magic row.
func trailerSize(align, maxAlign int) int {
	return maxSectors*3*align + maxAlign*4 + alignUp(magicLen, maxAlign)
}

func (p PadOptions) normalized() (PadOptions, error) {
	switch p.Align {
	case 1, 2, 4, 8, 16, 32:
	default:
		return p, fmt.Errorf("pad: alignment %d: want 1, 2, 4, 8, 16 or 32", p.Align)
	}
	if p.MaxAlign == 0 {
		p.MaxAlign = max(8, p.Align)
	}
	switch p.MaxAlign {
	case 8, 16, 32:
	default:
		return p, fmt.Errorf("pad: maximum alignment %d: want 8, 16 or 32", p.MaxAlign)
	}
	if p.MaxAlign < p.Align {
		return p, fmt.Errorf("pad: maximum alignment %d is below the alignment %d", p.MaxAlign, p.Align)
	}
	if p.Erased != 0xff && p.Erased != 0x00 {
		return p, fmt.Errorf("pad: erased value 0x%02x: want 0xff or 0x00", p.Erased)
	}
	return p, nil
}

// writeTrailer pads from imageLen to the slot size and writes the trailer.
func writeTrailer(w io.Writer, imageLen int64, p PadOptions) error {
	p, err := p.normalized()
	if err != nil {
		return err
	}
	tsize := int64(trailerSize(p.Align, p.MaxAlign))
	if imageLen+tsize > p.SlotSize {
		return fmt.Errorf("pad: image of %d bytes and trailer of %d do not fit a %d-byte slot", imageLen, tsize, p.SlotSize)
	}
	fill := make([]byte, copyBufSize)
	for i := range fill {
		fill[i] = p.Erased
	}
	writeFill := func(left int64) error {
		for left > 0 {
			n := min(left, int64(len(fill)))
			if _, err := w.Write(fill[:n]); err != nil {
				return fmt.Errorf("pad: %w", err)
			}
			left -= n
		}
		return nil
	}
	magicRow := int64(alignUp(magicLen, p.MaxAlign))
	okAt := p.SlotSize - magicRow - int64(p.MaxAlign) // the image_ok row precedes the magic row
	if err := writeFill(okAt - imageLen); err != nil {
		return err
	}
	okRow := append([]byte(nil), fill[:p.MaxAlign]...)
	if p.Confirm {
		okRow[0] = 0x01
	}
	if _, err := w.Write(okRow); err != nil {
		return fmt.Errorf("pad: %w", err)
	}
	if err := writeFill(magicRow - magicLen); err != nil {
		return err
	}
	magic := bootMagic(p.MaxAlign)
	if _, err := w.Write(magic[:]); err != nil {
		return fmt.Errorf("pad: %w", err)
	}
	return nil
}

// readTrailer reads whatever follows the TLVs and accepts nothing, or
// exactly what imgtool --pad [--confirm] writes.
func readTrailer(ctx context.Context, r io.Reader, base int64) (*Trailer, error) {
	buf := make([]byte, 32<<10)
	var tail []byte // the last bytes seen, at most trailerTailKeep after each read
	var n int64
	var erased byte
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		k, err := r.Read(buf)
		if k > 0 {
			if n == 0 {
				erased = buf[0]
				if k >= 3 && buf[0] != buf[1] && buf[1] == buf[2] {
					return nil, fail(RegionTrailer, base, ErrTrailingBytes, "byte 0x%02x where the erased fill that follows is 0x%02x", buf[0], buf[1])
				}
				if erased != 0xff && erased != 0x00 {
					return nil, fail(RegionTrailer, base, ErrTrailingBytes, "byte 0x%02x after the image: neither erased flash (0xff or 0x00) nor an MCUboot trailer", erased)
				}
			}
			n += int64(k)
			tail = append(tail, buf[:k]...)
			if drop := len(tail) - trailerTailKeep; drop > 0 {
				if i := firstNot(tail[:drop], erased); i >= 0 {
					at := base + n - int64(len(tail)) + int64(i)
					return nil, fail(RegionTrailer, at, ErrTrailingBytes, "byte 0x%02x in what should be erased fill (0x%02x)", tail[i], erased)
				}
				tail = append(tail[:0], tail[drop:]...)
			}
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read after the image at offset %d: %w", base+n, err)
		}
	}
	if n == 0 {
		return nil, nil
	}
	tailAt := base + n - int64(len(tail)) // offset of tail[0]
	bad := func(format string, args ...any) error {
		return fail(RegionTrailer, base, ErrTrailingBytes, "%d bytes after the image: %s", n, fmt.Sprintf(format, args...))
	}
	if len(tail) < magicLen {
		return nil, bad("too short for an MCUboot trailer")
	}
	var last [16]byte
	copy(last[:], tail[len(tail)-magicLen:])
	maxAlign := 0
	switch {
	case last == bootMagic8:
		maxAlign = 8
	case bytes.Equal(last[2:], bootMagicTail[:]):
		maxAlign = int(binary.LittleEndian.Uint16(last[:2]))
		if maxAlign != 16 && maxAlign != 32 {
			return nil, bad("trailer magic for alignment %d: want 16 or 32", maxAlign)
		}
	default:
		return nil, bad("no MCUboot boot magic at the end")
	}
	magicRow := alignUp(magicLen, maxAlign)
	minLen := maxAlign*2 + magicRow // overwrite-only trailer: image_ok, copy_done, magic
	if n < int64(minLen) {
		return nil, bad("%d bytes cannot hold a trailer for alignment %d (at least %d)", n, maxAlign, minLen)
	}
	okAt := len(tail) - magicRow - maxAlign // image_ok byte, within tail
	t := &Trailer{Len: n, SlotSize: base + n, ErasedValue: erased, MaxAlign: maxAlign}
	for i := 0; i < len(tail)-magicLen; i++ {
		c := tail[i]
		if i == okAt && c == 0x01 {
			t.ImageOK = true
			continue
		}
		if c != erased {
			what := "erased fill"
			if i == okAt {
				what = "the image_ok flag (0x01 or erased)"
			}
			return nil, fail(RegionTrailer, tailAt+int64(i), ErrTrailingBytes, "byte 0x%02x in %s (erased value 0x%02x)", c, what, erased)
		}
	}
	return t, nil
}

func firstNot(b []byte, v byte) int {
	for i, c := range b {
		if c != v {
			return i
		}
	}
	return -1
}
