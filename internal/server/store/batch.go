package store

import (
	"context"
	"errors"
)

// Group commit. Writes on the device path (check-ins, and the first offer
// of a rollout to a device) go to a goroutine that commits them in
// groups: while one transaction commits, the requests that arrive
// meanwhile queue up and go into the next one, so under load one fsync
// carries many of them and an idle server adds no delay. Each caller
// still returns only once its write is committed.

// maxBatch is the most requests one transaction carries.
const maxBatch = 256

// errClosed is returned for a write asked of a closed store.
var errClosed = errors.New("the store is closed")

// batchLoop takes requests from in and hands them to commit in groups of
// at most maxBatch, until quit is closed.
func batchLoop[T any](quit <-chan struct{}, in <-chan T, commit func([]T)) {
	batch := make([]T, 0, maxBatch)
	for {
		select {
		case <-quit:
			return
		case first := <-in:
			batch = append(batch[:0], first)
		}
	drain:
		for len(batch) < maxBatch {
			select {
			case r := <-in:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		commit(batch)
	}
}

// submit queues req for its batch loop and waits for its result on done
// (a channel with room for one, which the commit fills).
func submit[T, R any](ctx context.Context, quit <-chan struct{}, in chan<- T, req T, done <-chan R) (R, error) {
	var zero R
	select {
	case <-quit:
		return zero, errClosed
	default:
	}
	select {
	case in <- req:
	case <-quit:
		return zero, errClosed
	case <-ctx.Done():
		return zero, ctx.Err()
	}
	select {
	case r := <-done:
		return r, nil
	case <-quit: // closed before the batch loop took it
		return zero, errClosed
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}
