package bootenv

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ConfigLine is one line of an fw_env.config file:
//
//	# device      offset   size     [sector size  [sectors]]
//	/dev/mmcblk0  0x400000 0x4000
//	/dev/mmcblk0  0x404000 0x4000
//
// Numbers are decimal or 0x hex; a negative offset counts from the end of
// the device, as in U-Boot's tools.
type ConfigLine struct {
	Device     string
	Offset     int64
	Size       int64
	SectorSize int64
	Sectors    int64
}

// ParseConfig reads fw_env.config text.
func ParseConfig(text string) ([]ConfigLine, error) {
	var lines []ConfigLine
	sc := bufio.NewScanner(strings.NewReader(text))
	n := 0
	for sc.Scan() {
		n++
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) < 3 || len(f) > 5 {
			return nil, fmt.Errorf("fw_env.config line %d: want DEVICE OFFSET SIZE [SECTOR-SIZE [SECTORS]], got %d fields", n, len(f))
		}
		var nums [4]int64
		for i, s := range f[1:] {
			v, err := strconv.ParseInt(s, 0, 64)
			if err != nil {
				return nil, fmt.Errorf("fw_env.config line %d: %q is not a number", n, s)
			}
			nums[i] = v
		}
		c := ConfigLine{Device: f[0], Offset: nums[0], Size: nums[1], SectorSize: nums[2], Sectors: nums[3]}
		if c.Size < 16 || c.Size > 1<<24 {
			return nil, fmt.Errorf("fw_env.config line %d: environment size %d is not plausible", n, c.Size)
		}
		lines = append(lines, c)
	}
	if len(lines) == 0 {
		return nil, fmt.Errorf("fw_env.config describes no environment")
	}
	if len(lines) > 2 {
		return nil, fmt.Errorf("fw_env.config describes %d copies: at most 2", len(lines))
	}
	return lines, nil
}

// LoadConfig reads and parses an fw_env.config file, noting which devices
// are regular files.
func LoadConfig(path string) ([]ConfigLine, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	lines, err := ParseConfig(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return lines, nil
}
