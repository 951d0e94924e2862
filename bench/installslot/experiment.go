// Experimental variants, for the analysis in bench/README.md only: nothing
// here is the measured product code, and the targets are checked against
// agent.InstallImage alone. Run them with -experiment.

package main

import (
	"context"
	"crypto"
	"fmt"
	"io"

	"github.com/fieldpatch/fieldpatch/internal/device/slot"
)

// experimentVariants are timed after dd and install in each round.
var experimentVariants = []string{"copy"}

func runExperiment(ctx context.Context, variant string, src io.Reader, dst slot.Device, keys []crypto.PublicKey, total int64) error {
	switch variant {
	case "copy":
		return experimentCopy(src, dst)
	}
	return fmt.Errorf("unknown variant %q", variant)
}

// experimentCopy is InstallImage without the image: the same 256 KiB reads
// and writes, no parsing, no hashing, then fsync.
func experimentCopy(src io.Reader, dst slot.Device) error {
	buf := make([]byte, 256<<10)
	var off int64
	for {
		n, err := io.ReadFull(src, buf)
		if n > 0 {
			if _, werr := dst.WriteAt(buf[:n], off); werr != nil {
				return werr
			}
			off += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return err
		}
	}
	return dst.Sync()
}
