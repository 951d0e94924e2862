# fieldpatch: the two commands are `make demo` and `make test`.

GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
BIN     := bin

.PHONY: all build demo tour test test-deps vet bench clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/fieldpatch ./cmd/fieldpatch-agent

# The whole story on embedded defaults: a server with fresh keys, 2,000
# virtual devices, a bad release caught at the canary, a good one rolled
# out through power cuts, link faults and offline devices; a report, and
# fieldpatch-demo.svg. Exit 0 only when the story held.
demo: build
	./$(BIN)/fieldpatch demo --svg fieldpatch-demo.svg

# A walk through the command line, step by step, with one real device.
tour: build
	./scripts/demo.sh

test-deps:
	./scripts/test-deps.sh

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

# Every test, with the race detector where affordable, and with missing peer
# tools (openssl, fw_printenv, qemu...) a failure rather than a skip. The
# power-cut campaign (1,500 cuts) runs without the race detector, which
# would make it several times slower; the code it drives runs under the
# race detector in the other tests.
test: test-deps vet
	FIELDPATCH_REQUIRE_PEERS=1 $(GO) test -race -count=1 -timeout 20m -skip TestPowerCutCampaign ./...
	$(GO) test -count=1 -timeout 20m -run TestPowerCutCampaign -v ./internal/device/simdev

# Long campaigns and measurements against peers; see bench/README.md.
bench: build
	./scripts/test-deps.sh --bench
	-$(GO) run ./bench/imageverify -bin $(BIN)
	-$(GO) run ./bench/installslot
	-$(GO) run ./bench/agentidle -bin $(BIN)
	-$(GO) run ./bench/checkin -bin $(BIN)
	-$(GO) run ./bench/coap -bin $(BIN)
	-$(GO) run ./bench/fleet -bin $(BIN) -devices 10000,50000
	-$(GO) run ./bench/mqtt -bin $(BIN) -devices 10000
	$(GO) test -count=1 -timeout 60m -run TestPowerCutCampaign -v ./internal/device/simdev -campaign 10000

clean:
	rm -rf $(BIN)
